"""LSQ+: learnable step size *and* offset (Bhalgat et al., CVPR Workshops 2020).

Asymmetric activations (Swish, GELU, logits) waste LSQ's zero-anchored grid; LSQ+ shifts the grid by a learnable
float offset ``beta``. With ``v = (x - beta) / s``:

    y = clamp(round(v), qmin, qmax) * s + beta                               (paper eq. 3)

Gradients (STE for ``round``; paper eq. 5-6), derived from ``y = s * clamp(v) + beta``:

    dy/ds    = round(v) - v  if qmin < v < qmax;  qmin if v <= qmin;  qmax if v >= qmax
    dy/dbeta = 0             if qmin < v < qmax;  1 otherwise
    dy/dx    = 1             if qmin < v < qmax;  0 otherwise

(inside the range ``d(s * round(v))/dbeta = s * (-1/s) = -1`` cancels the ``+1`` of the offset; outside, ``y`` is
a constant level plus ``beta``). Both gradients are scaled by LSQ's ``g = 1 / sqrt(N * qmax)``: each sums over
the same ``N`` elements, and the paper trains ``beta`` with the LSQ recipe.

Symmetric grids (the paper's weights) have no offset: ``beta`` is a zero buffer and only ``s`` is learned.

Export: a runtime's grid is ``(q - z) * s`` with an *integer* zero point, so ``z = clamp(round(-beta / s), qmin,
qmax)``, i.e. ``beta`` snapped to ``-z * s``, at most half a step from the trained offset. Training uses the float
offset (the paper's forward); eval mode uses the snapped grid through the deploy view's own function (see
``base``), so the eval model and the exported model agree exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mq_algos.quantizers.base import LearnableFakeQuantizer, elements_per_scale, positive, reduce_to
from mq_core.plugin_api import SCALE_EPS, ClipStdObserver, Observer, QuantScheme, along_axis


class LSQPlusFunction(torch.autograd.Function):
    """The LSQ+ forward and gradients of the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
                axis: int | None, g: float) -> torch.Tensor:  # type: ignore[override]
        s = along_axis(scale, x, axis)
        beta = along_axis(offset, x, axis)
        v = (x - beta) / s
        r = torch.round(v)
        ctx.save_for_backward(scale, offset, v, r)
        ctx.qmin, ctx.qmax, ctx.axis, ctx.g = qmin, qmax, axis, g
        return torch.clamp(r, qmin, qmax) * s + beta

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        scale, offset, v, r = ctx.saved_tensors
        below, above = v <= ctx.qmin, v >= ctx.qmax
        outside = below | above
        grad_x = grad * ~outside if ctx.needs_input_grad[0] else None
        grad_s = grad_beta = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(below, float(ctx.qmin), torch.where(above, float(ctx.qmax), r - v))
            grad_s = reduce_to(grad * ds, scale, ctx.axis) * ctx.g
        if ctx.needs_input_grad[2]:
            grad_beta = reduce_to(grad * outside, offset, ctx.axis) * ctx.g
        return grad_x, grad_s, grad_beta, None, None, None, None


class LSQPlusFakeQuantizer(LearnableFakeQuantizer):
    """LSQ+ with a learnable ``scale`` and, on affine grids, a learnable float ``offset`` (beta)."""

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True) -> None:
        super().__init__(scheme, observer, exact)
        self.scale = nn.Parameter(torch.ones(()))
        if scheme.symmetric:
            self.register_buffer("offset", torch.zeros(()))
        else:
            self.offset = nn.Parameter(torch.zeros(()))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """``scale`` from the observer; ``beta = -z * s``, the observer's grid start ``(qmin - z) s`` placed at
        ``qmin`` (for the ``lsq_plus`` observer on affine grids: the paper's min/max initialisation)."""
        self._assign("scale", scale)
        offset = -zero_point.to(torch.float32) * scale
        self._assign("offset", offset, learnable=not self.scheme.symmetric)
        self.calibrated.fill_(1)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(elements_per_scale(x, self.ch_axis, self.batch_ranks()) * self.scheme.qmax)
        return LSQPlusFunction.apply(x, positive(self.scale), self.offset, self.scheme.qmin, self.scheme.qmax,
                                     self.ch_axis, g)

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.clamp(self.scale.detach(), min=SCALE_EPS).to(torch.float32)
        z = torch.clamp(torch.round(-self.offset.detach().to(torch.float32) / scale), self.scheme.qmin,
                        self.scheme.qmax)
        return scale, z.to(torch.int32)


class LSQPlusObserver(ClipStdObserver):
    """LSQ+ initialisation (Section 3.3).

    * symmetric grids (the paper's weights): ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``, z = 0. The
      paper's ``2^(b-1)`` is the number of levels on the positive side of a signed b-bit grid, i.e. ``qmax + 1``;
      mq uses ``qmax + 1`` for unsigned symmetric grids too (``2^b``, all levels on one side).
    * affine grids (the paper's activations): min/max, ``s = (max - min) / (qmax - qmin)``, ``beta = min - qmin s``
      (the range widened to include 0 and beta snapped to an integer zero point, mq's grid rule).

    Mean and standard deviation come from float64 sums over every element seen (per channel when per-channel).
    """

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme, k=3.0)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.scheme.symmetric:
            return self.scheme.qparams(self.min_val, self.max_val)
        n = self.count.to(torch.float64)
        mean = self.sum / n
        std = (self.sum_sq / n - mean.square()).clamp(min=0).sqrt()
        amax = torch.maximum((mean - self.k * std).abs(), (mean + self.k * std).abs()).to(torch.float32)
        scale = torch.clamp(amax / (self.scheme.qmax + 1), min=SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scheme.range_of(*self.calculate_qparams())
