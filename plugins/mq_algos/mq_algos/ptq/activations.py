"""Activation quantizers during reconstruction: LSQ step-size learning (BRECQ) and random drop (QDrop).

QDrop quantizes each element with probability ``drop_prob`` and otherwise passes a float value through: the
float model's value for a quantizer of a unit input (``fallback``), the quantizer's own input elsewhere.

Both only replace ``quantize_forward`` of the activation quantizers inside the unit being reconstructed, and only
for the optimisation loop (the ``patched`` context manager); caching inputs and targets, and everything after,
runs the quantizers unchanged. A learned scale is written back with ``set_qparams`` (the zero point is kept), so
the deploy view and exports see it like any calibrated scale.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mq_core.plugin_api import SCALE_EPS, FakeQuantizer, along_axis

log = logging.getLogger(__name__)

QuantizeFn = Callable[[torch.Tensor], torch.Tensor]


def uses_fixed_forward(fq: FakeQuantizer) -> bool:
    """Whether ``fq`` quantizes with its buffers' fixed qparams (not a learnable quantizer's own forward)."""
    return type(fq).quantize_forward is FakeQuantizer.quantize_forward


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """Value of ``t``, gradient scaled by ``g`` (LSQ's step-size gradient scale)."""
    return (t - t * g).detach() + t * g


def lsq_fake_quantize(fq: FakeQuantizer, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LSQ (Esser et al. 2020) with a learnable ``scale`` and ``fq``'s fixed zero point and grid.

    Rounding uses the straight-through estimator, so d/ds is ``round(x/s) - x/s`` inside the grid and
    ``qmin - z`` / ``qmax - z`` below / above it; the gradient is scaled by ``1 / sqrt(N * qmax)``.
    """
    qmin, qmax, axis = fq.scheme.qmin, fq.scheme.qmax, fq.ch_axis
    per_scale = x.numel() // max(scale.numel(), 1)
    s = along_axis(_grad_scale(scale, 1.0 / math.sqrt(per_scale * max(qmax, 1))), x, axis)
    z = along_axis(fq.zero_point, x, axis).to(x.dtype)
    v = x / s
    q = torch.clamp((torch.round(v) - v).detach() + v + z, qmin, qmax)
    return (q - z) * s


class ActivationPatch:
    """The replacement ``quantize_forward`` of one activation quantizer while its unit is reconstructed."""

    def __init__(self, fq: FakeQuantizer, learn_scale: bool, drop_prob: float, generator: torch.Generator) -> None:
        self.fq = fq
        self.drop_prob = drop_prob
        self.generator = generator
        # A power-of-two grid must keep its scale a power of two, and a learnable quantizer owns its parameters.
        self.learn = learn_scale and uses_fixed_forward(fq) and not fq.scheme.pot_scale
        self.scale = nn.Parameter(fq.scale.detach().clone()) if self.learn else None
        self.original: QuantizeFn = fq.quantize_forward
        #: For a quantizer of a unit input: which input it is (set by the engine).
        self.input_index: int | None = None
        #: The float model's value of that input for the current step: what a dropped element falls back to, as
        #: in the QDrop reference code (elsewhere a dropped element keeps the quantized model's float value).
        self.fallback: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        quantized = lsq_fake_quantize(self.fq, x, self.scale) if self.scale is not None else self.original(x)
        if self.drop_prob >= 1.0:
            return quantized
        quantize = torch.rand(x.shape, generator=self.generator, device=self.generator.device) < self.drop_prob
        dropped = self.fallback if self.fallback is not None and self.fallback.shape == x.shape else x
        return torch.where(quantize.to(x.device), quantized, dropped)

    def write_back(self) -> None:
        if self.scale is not None:
            self.fq.set_qparams(self.scale.detach().clamp(min=SCALE_EPS), self.fq.zero_point)


@contextmanager
def patched(patches: dict[FakeQuantizer, QuantizeFn]) -> Iterator[None]:
    """Replace each quantizer's ``quantize_forward`` (an instance attribute shadowing the method) inside the block."""
    for fq, fn in patches.items():
        fq.quantize_forward = fn  # type: ignore[method-assign]
    try:
        yield
    finally:
        for fq in patches:
            del fq.quantize_forward
