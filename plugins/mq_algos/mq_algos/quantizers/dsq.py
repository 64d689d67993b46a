"""DSQ: Differentiable Soft Quantization (Gong et al., ICCV 2019).

The straight-through estimator ignores where inside a step a value lies; DSQ backpropagates through a smooth
staircase that approaches the hard one. The clipping range ``[l, u]`` is learned, the ``n = qmax - qmin`` steps
have width ``Delta = (u - l) / n``, and a value in step ``i`` (``m_i`` its midpoint) is mapped by the paper's
(eq. 3-5)

    phi(x)  = s tanh(k (x - m_i)),   s = 1 / tanh(0.5 k Delta),   alpha = 1 - tanh(0.5 k Delta)
    Q_S(x)  = l + Delta (i + (phi(x) + 1) / 2).

In grid units ``t = (clip(x, l, u) - l) / Delta`` this is the staircase of mq's reference sheet,

    phi(t) = floor(t) + 0.5 k_s tanh(k (t - floor(t) - 0.5)) + 0.5,
    k_s = 1 / (1 - alpha),   k = ln((k_s + 1) / (k_s - 1)),

the same function (``k_s`` is the paper's ``s``, ``k`` its ``k Delta``: ``tanh(k / 2) = 1 / k_s = 1 - alpha``;
tests/algos check the two forms agree). The forward is the hard quantization ``round(phi(t))`` (the paper's sign
function, equal to rounding ``t``) and the gradient is ``phi'`` (straight-through only for that final rounding):

    y = l + Delta * round_ste(phi(t)),    dphi/dt = 0.5 k_s k (1 - tanh^2(k (t - floor(t) - 0.5))).

``l``, ``u`` (and ``alpha`` with ``learn_alpha``) get their gradients through that expression; ``alpha`` small
means close to hard rounding. Symmetric grids learn only ``u`` (``l = u qmin / qmax``, so the zero point stays 0).

Export: the grid ``l + i Delta`` is ``(q - z) * Delta`` with ``z = clamp(round(qmin - l / Delta), qmin, qmax)``
(exact on symmetric grids; on affine ones ``l`` is snapped to the grid, within half a step). Eval mode runs that
exported grid (see ``base``), so eval and deploy agree exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from mq_algos.quantizers.base import LearnableFakeQuantizer, RoundSTE, positive
from mq_core.plugin_api import SCALE_EPS, ConfigError, Observer, QuantScheme, along_axis

#: ``alpha`` is kept inside (0, 1), where the staircase is defined (0: hard steps, 1: the identity).
ALPHA_RANGE = (1e-3, 1.0 - 1e-3)


def soft_staircase(t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """DSQ's ``phi(t)`` in grid units (module docstring); differentiable in ``t`` and ``alpha``."""
    k_s = 1.0 / (1.0 - alpha)
    k = torch.log((k_s + 1.0) / (k_s - 1.0))
    floor = torch.floor(t).detach()
    return floor + 0.5 * k_s * torch.tanh(k * (t - floor - 0.5)) + 0.5


class DSQFakeQuantizer(LearnableFakeQuantizer):
    """DSQ with learnable clipping bounds ``lower``/``upper`` (``upper`` only on symmetric grids).

    Args:
        alpha: the characteristic variable in (0, 1); 0.4 is MQBench's default.
        learn_alpha: make ``alpha`` a parameter (kept inside ``ALPHA_RANGE``) instead of a constant.
    """

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True,
                 alpha: float = 0.4, learn_alpha: bool = False) -> None:
        super().__init__(scheme, observer, exact)
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"dsq alpha must be in (0, 1), got {alpha!r}.")
        self.upper = nn.Parameter(torch.ones(()))
        if not scheme.symmetric:
            self.lower = nn.Parameter(torch.zeros(()))
        value = torch.tensor(float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(value)
        else:
            self.register_buffer("alpha", value)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """The observer's representable range ``[(qmin - z) s, (qmax - z) s]`` becomes ``[lower, upper]``."""
        lo, hi = self.scheme.range_of(scale, zero_point)
        self._assign("upper", hi)
        if not self.scheme.symmetric:
            self._assign("lower", lo)
        self.calibrated.fill_(1)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(l, u, Delta)``, the step kept at or above float32 eps."""
        n = self.scheme.qmax - self.scheme.qmin
        upper = self.upper
        lower = self.lower if not self.scheme.symmetric else upper * (self.scheme.qmin / self.scheme.qmax)
        return lower, upper, positive(upper - lower, SCALE_EPS * n) / n

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        lower, upper, delta = (along_axis(t, x, self.ch_axis) for t in self.bounds())
        clipped = torch.where(x < lower, lower, torch.where(x > upper, upper, x))
        t = (clipped - lower) / delta
        alpha = torch.clamp(self.alpha, *ALPHA_RANGE)
        return lower + delta * RoundSTE.apply(soft_staircase(t, alpha))

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower, _, delta = (t.detach().to(torch.float32) for t in self.bounds())
        if self.scheme.symmetric:
            return delta, torch.zeros_like(delta, dtype=torch.int32)
        z = torch.clamp(torch.round(self.scheme.qmin - lower / delta), self.scheme.qmin, self.scheme.qmax)
        return delta, z.to(torch.int32)

