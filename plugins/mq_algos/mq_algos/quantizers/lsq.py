"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020).

The step size ``s`` is a parameter trained with the task loss. With ``v = x / s`` and the grid ``[qmin, qmax]``
around a fixed integer zero point ``z`` (``lo = qmin - z``, ``hi = qmax - z``), the forward is

    y = (clamp(round(v) + z, qmin, qmax) - z) * s                           (paper eq. 1-2)

and the paper's gradients (eq. 3, the straight-through estimator for ``round``) are

    dy/ds = round(v) - v   if lo < v < hi
          = lo             if v <= lo
          = hi             if v >= hi
    dy/dx = 1 inside, 0 outside,

with the step-size gradient multiplied by ``g = 1 / sqrt(N * qmax)`` (Section 2.2), so that the step size learns
at a rate comparable to the weights. ``N`` is the number of elements one step size quantizes in the tensor at
hand: the whole tensor (for activations this includes the batch, MQBench's convention; the paper's ``N_F`` counts
one sample's features), or one channel when per-channel. Under DistributedDataParallel the batch is the global
one (``LearnableFakeQuantizer.batch_ranks``), so two ranks on half batches train exactly as one process on both.

Zero point: the paper's grids have ``z = 0`` (signed grids for signed data, unsigned ones for ReLU outputs).
mq's backends also hand out affine activation grids; there the zero point comes from the observer and stays
fixed (``z = qmin`` for non-negative data, as in the paper; a tensor that was seen negative, e.g. logits on a
uint grid, keeps room for its negative part instead of being clipped at 0, but never all of it: see
``LSQObserver``). Learning it too is LSQ+.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from mq_algos.quantizers.base import LearnableFakeQuantizer, elements_per_scale, positive, reduce_to
from mq_core.plugin_api import SCALE_EPS, MinMaxObserver, Observer, QuantScheme, along_axis, channels_first


class LSQFunction(torch.autograd.Function):
    """The LSQ forward and gradients of the module docstring, for a per-tensor or per-channel step size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                axis: int | None, g: float) -> torch.Tensor:  # type: ignore[override]
        s = along_axis(scale, x, axis)
        z = along_axis(zero_point, x, axis).to(x.dtype)
        v = x / s
        r = torch.round(v)
        # The same operations, in the same order, as mq_core.quant.functional.fake_quantize (the deploy view).
        y = (torch.clamp(r + z, qmin, qmax) - z) * s
        lo, hi = qmin - z, qmax - z
        ctx.save_for_backward(scale, v, r, lo, hi)
        ctx.axis, ctx.g = axis, g
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        scale, v, r, lo, hi = ctx.saved_tensors
        below, above = v <= lo, v >= hi
        grad_x = grad * ~(below | above) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(below, lo, torch.where(above, hi, r - v))
            grad_s = reduce_to(grad * ds, scale, ctx.axis) * ctx.g
        return grad_x, grad_s, None, None, None, None, None


class LSQFakeQuantizer(LearnableFakeQuantizer):
    """LSQ with a learnable step size ``scale`` (an ``nn.Parameter``, per channel when per-channel).

    The step size is kept at or above float32 eps in the forward (gradients pass through that floor, see
    ``base.ClampMinSTE``); the exported scale is that same floored value.
    """

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True) -> None:
        super().__init__(scheme, observer, exact)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """The observer's step size becomes the initial ``scale``; its zero point is kept (0 on symmetric grids)."""
        self._assign("scale", scale)
        self._assign("zero_point", zero_point.to(torch.int32), learnable=False)
        self.calibrated.fill_(1)

    def gradient_scale(self, x: torch.Tensor) -> float:
        return 1.0 / math.sqrt(elements_per_scale(x, self.ch_axis, self.batch_ranks()) * self.scheme.qmax)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return LSQFunction.apply(x, positive(self.scale), self.zero_point, self.scheme.qmin, self.scheme.qmax,
                                 self.ch_axis, self.gradient_scale(x))

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.clamp(self.scale.detach(), min=SCALE_EPS).to(torch.float32)
        return scale, self.zero_point.detach().clone()


class LSQObserver(MinMaxObserver):
    """LSQ's initial step size ``s = 2 mean|x| / sqrt(qmax)`` (Section 2.1), over every element seen.

    ``mean|x|`` is accumulated in float64 over all batches (per channel when per-channel), so batching does not
    change the result. The zero point is 0 on symmetric grids. On affine grids the ``N = qmax - qmin`` steps of
    ``s`` are shared between the two sides of 0 (the observed range widened to include 0). The negative side gets
    the levels it needs to reach the minimum, as far as the positive side's need leaves room, and at least half
    the grid when it needs that much: ``z = qmin + min(below, max(N - above, N // 2))`` with ``below`` and
    ``above`` the steps to the minimum and the maximum. So a range that fits has its minimum on ``qmin`` (``z =
    qmin`` for non-negative data, the paper's grid), a side that fits is covered when only the other overflows,
    and two overflowing sides split the grid in half, as the signed grid LSQ's step is derived for. (Clamping
    ``qmin - round(min / s)`` into the grid instead gave data with a long negative tail the range ``[lo, 0]``,
    clipping every positive value to 0.)

    Across ranks (``sync``) ``abs_sum`` and ``count`` are summed and min/max all-reduced: the single-process
    statistics of every rank's data.
    """

    merge_rules: ClassVar[dict[str, str]] = {**MinMaxObserver.merge_rules, "abs_sum": "sum", "count": "sum"}

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("abs_sum", torch.empty(0, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def observe(self, x: torch.Tensor) -> None:
        first = not self.observed
        super().observe(x)
        rows = x.reshape(1, -1) if self.ch_axis is None else channels_first(x, self.ch_axis)
        batch = rows.to(torch.float64).abs().sum(dim=1).reshape(self.min_val.shape)
        self.abs_sum = batch if first else self.abs_sum + batch
        self.count += rows.shape[1]

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean_abs = (self.abs_sum / self.count.to(torch.float64)).to(torch.float32)
        scale = torch.clamp(2.0 * mean_abs / math.sqrt(self.scheme.qmax), min=SCALE_EPS)
        if self.scheme.symmetric:
            return scale, torch.zeros_like(scale, dtype=torch.int32)
        steps = self.scheme.qmax - self.scheme.qmin
        below = -torch.round(torch.clamp(self.min_val, max=0.0) / scale)
        above = torch.round(torch.clamp(self.max_val, min=0.0) / scale)
        negative_levels = torch.minimum(below, torch.clamp(steps - above, min=steps // 2))
        return scale, (self.scheme.qmin + negative_levels).to(torch.int32)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scheme.range_of(*self.calculate_qparams())
