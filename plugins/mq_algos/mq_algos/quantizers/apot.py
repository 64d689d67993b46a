"""APoT: Additive Powers-of-Two quantization (Li et al., ICLR 2020). Research simulation only.

Weights and activations are bell-shaped, so levels dense near zero fit them better than a uniform grid; plain
powers of two are too sparse at the top. APoT's levels are sums of ``n`` powers of two, one from each of ``n``
disjoint sets (paper eq. 5, with ``k = 2``: each term is 0 or one of three powers)::

    term t in {0, 2^-(t+1), 2^-(t+1+n), 2^-(t+1+2n)},   level = alpha * (sum of terms) / max(sum)

For ``B`` magnitude bits ``n = ceil(B / 2)`` terms; with ``B`` even all have four options (the paper's ``b = kn``,
the official code's B = 2, 4, 6 sets exactly), with ``B`` odd the last term has two, ``{0, 2^-n}`` (mq's choice;
the paper leaves odd widths open). Unsigned grids use all ``b`` bits for the magnitude (``2^b`` levels); signed
grids use a sign bit and ``b - 1`` magnitude bits (``2^b - 1`` levels, 0 shared).

Clipping level ``alpha`` is learned as in the paper (Section 2.2, like PACT but with the LSQ-style gradient of
``alpha * P(clip(x / alpha))``, ``P`` the projection with a straight-through gradient):

    dy/dalpha = P(v) - v inside (|v| < 1),  sign(v) outside;   dy/dx = 1 inside, 0 outside   (v = x / alpha).

``weight_norm`` standardises the tensor first (``(x - mean) / std``, per channel when per-channel), the paper's
weight normalisation that keeps ``alpha`` training stable.

Export: the levels are non-uniform, no integer grid ``(q - z) * s`` holds them, and no target mq exports to runs
a lookup-table dequantization. ``export_qparams`` raises ``ExportError``; eval mode runs the same APoT
simulation as training.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from mq_algos.quantizers.base import LearnableFakeQuantizer, positive
from mq_core.plugin_api import SCALE_EPS, ExportError, Observer, QuantScheme, along_axis, channels_first

#: Added to the standard deviation by ``weight_norm`` (a constant channel stays finite).
NORM_EPS = 1e-5


def apot_levels(bits: int) -> torch.Tensor:
    """The sorted APoT magnitude levels in [0, 1] for ``bits`` magnitude bits (module docstring)."""
    n = (bits + 1) // 2
    terms = []
    for t in range(n):
        options = 2 if bits % 2 and t == n - 1 else 4
        terms.append([0.0] + [2.0 ** -(t + 1 + j * n) for j in range(options - 1)])
    sums = sorted({sum(combo) for combo in itertools.product(*terms)})
    levels = torch.tensor(sums, dtype=torch.float64)
    return (levels / levels.max()).to(torch.float32)


class ProjectSTE(torch.autograd.Function):
    """Nearest APoT level (ties to the smaller magnitude) with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        levels = levels.to(v.dtype)
        midpoints = (levels[1:] + levels[:-1]) / 2
        magnitude = levels[torch.bucketize(v.abs(), midpoints)]
        return torch.sign(v) * magnitude

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class APoTFakeQuantizer(LearnableFakeQuantizer):
    """APoT with a learnable clipping level ``alpha`` (per channel when per-channel); simulation only.

    Args:
        weight_norm: standardise the tensor before quantizing it (the paper does for weights).
    """

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True,
                 weight_norm: bool = False) -> None:
        super().__init__(scheme, observer, exact)
        self.weight_norm = weight_norm
        self.alpha = nn.Parameter(torch.ones(()))
        magnitude_bits = scheme.bits - 1 if scheme.signed else scheme.bits
        self.register_buffer("levels", apot_levels(magnitude_bits), persistent=False)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """``alpha`` = the largest magnitude of the observer's range (its top on unsigned grids)."""
        lo, hi = self.scheme.range_of(scale, zero_point)
        alpha = torch.maximum(-lo, hi) if self.scheme.signed else hi
        self._assign("alpha", alpha)
        self.calibrated.fill_(1)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis is None:
            return (x - x.mean()) / (x.std(correction=0) + NORM_EPS)
        rows = channels_first(x, self.ch_axis)
        mean = along_axis(rows.mean(dim=1), x, self.ch_axis)
        std = along_axis(rows.std(dim=1, correction=0), x, self.ch_axis)
        return (x - mean) / (std + NORM_EPS)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_norm:
            x = self._normalize(x)
        alpha = along_axis(positive(self.alpha, SCALE_EPS), x, self.ch_axis)
        v = torch.clamp(x / alpha, -1.0 if self.scheme.signed else 0.0, 1.0)
        return ProjectSTE.apply(v, self.levels) * alpha

    def quantize_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.surrogate(x)

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise ExportError(
            f"APoT quantizer {self.qname}: APoT levels are non-uniform; no target in mq executes them (every export "
            "is a uniform Q/DQ grid). Use it for research simulation only, or train with 'lsq' to deploy."
        )
