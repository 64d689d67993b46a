"""PACT: Parameterized Clipping Activation (Choi et al., 2018), for activations.

ReLU outputs are unbounded, so a fixed clipping range either clips large values or wastes levels. PACT replaces
ReLU's open top with a learnable clipping level ``alpha``:

    y = clip(x, 0, alpha),   y_q = round(y * qmax / alpha) * alpha / qmax          (paper eq. 1-2)

and trains ``alpha`` with the straight-through estimator for the rounding (paper eq. 3):

    dy_q/dalpha = 1 if x >= alpha else 0,      dy_q/dx = 1 if 0 <= x < alpha else 0.

``alpha`` is a parameter with its own name (``PACTFakeQuantizer.decay_parameter``); the paper regularises it
with L2 weight decay, which keeps the clipping level from drifting up where it stops clipping. Put it in a param
group with weight decay (see ``pact_parameters``).

Grid: scale ``s = alpha / qmax`` with zero point 0, i.e. on unsigned grids ``z = qmin = 0`` and the export scale
``alpha / (qmax - qmin)``. On a signed grid the clip is the grid's own range, ``clip(x, qmin s, alpha)``
(``-alpha`` on a narrow-range grid; ``dy/dalpha = qmin / qmax`` below it), the natural extension for signed
inputs and the only one a runtime's grid reproduces. The unsigned formulas are the same ones with ``qmin = 0``.
PACT clips at 0 on unsigned grids: it is meant for ReLU outputs, and a tensor seen negative during calibration
(logged as a warning) loses its negative part; keep such layers in float or give them another quantizer.

Training uses the deploy formula ``clamp(round(x / s), qmin, qmax) * s`` itself (the same values as clipping
first), so training, eval and export agree exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mq_algos.quantizers.base import LearnableFakeQuantizer, positive, reduce_to
from mq_core.plugin_api import SCALE_EPS, ConfigError, Observer, QuantScheme, along_axis

log = logging.getLogger(__name__)


class PACTFunction(torch.autograd.Function):
    """PACT's forward and gradients (module docstring) for a per-tensor or per-channel ``alpha``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, qmin: int, qmax: int,
                axis: int | None) -> torch.Tensor:  # type: ignore[override]
        a = along_axis(alpha, x, axis)
        s = a / torch.full_like(a, qmax)  # a true division on CUDA too (``a / qmax`` multiplies by 1 / qmax there)
        ctx.save_for_backward(x, alpha)
        ctx.qmin, ctx.qmax, ctx.axis = qmin, qmax, axis
        return torch.clamp(torch.round(x / s), qmin, qmax) * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        a = along_axis(alpha, x, ctx.axis)
        ratio = ctx.qmin / ctx.qmax
        above, below = x >= a, x < a * ratio
        grad_x = grad * ~(above | below) if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            dalpha = above.to(grad.dtype) + ratio * below.to(grad.dtype)
            grad_alpha = reduce_to(grad * dalpha, alpha, ctx.axis)
        return grad_x, grad_alpha, None, None, None


class PACTFakeQuantizer(LearnableFakeQuantizer):
    """PACT with a learnable clipping level ``alpha``.

    Args:
        init_alpha: initial clipping level (the paper uses 10; MQBench 6). ``None`` (default) starts from the
            observer: the top of its calibrated range, which suits small-valued networks far better than a
            constant.
    """

    #: Name of the clipping parameter, for an optimizer param group with weight decay.
    decay_parameter = "alpha"

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True,
                 init_alpha: float | None = None) -> None:
        super().__init__(scheme, observer, exact)
        if init_alpha is not None and not init_alpha > 0:
            raise ConfigError(f"pact init_alpha must be positive, got {init_alpha!r}.")
        self.init_alpha = init_alpha
        self.alpha = nn.Parameter(torch.ones(()))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """``alpha`` = ``init_alpha``, or the top of the observer's range ``(qmax - z) * s``."""
        if not self.scheme.signed and bool((zero_point > self.scheme.qmin).any()):
            log.warning("PACT quantizer %s saw negative values during calibration; it clips them to 0 (PACT is "
                        "meant for ReLU outputs).", self.qname)
        top = (self.scheme.qmax - zero_point.to(torch.float32)) * scale
        alpha = top if self.init_alpha is None else torch.full_like(scale, self.init_alpha)
        self._assign("alpha", alpha)
        self.calibrated.fill_(1)

    def _alpha(self) -> torch.Tensor:
        return positive(self.alpha, SCALE_EPS * self.scheme.qmax)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return PACTFunction.apply(x, self._alpha(), self.scheme.qmin, self.scheme.qmax, self.ch_axis)

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self._alpha().detach()
        scale = (alpha / torch.full_like(alpha, self.scheme.qmax)).to(torch.float32)  # as the forward divides
        return scale, torch.zeros_like(scale, dtype=torch.int32)


def pact_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, alpha)`` of every PACT quantizer in ``model``, e.g. for a weight-decayed param group::

        alphas = dict(pact_parameters(qmodel))
        rest = [p for n, p in qmodel.named_parameters() if n not in alphas]
        torch.optim.SGD([{"params": rest}, {"params": list(alphas.values()), "weight_decay": 5e-4}], lr=0.01)
    """
    for name, module in model.named_modules():
        if isinstance(module, PACTFakeQuantizer):
            yield f"{name}.{module.decay_parameter}" if name else module.decay_parameter, module.alpha
