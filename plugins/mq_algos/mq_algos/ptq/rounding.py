"""AdaRound's learnable rounding of one layer's weight, and baking the chosen rounding into the layer.

The weight quantizer keeps its scale and zero point; only the rounding direction of each weight changes. The
deploy view (and every exporter) re-quantizes the deploy weight with nearest rounding, so the learned rounding
must end up *in the weight itself*: ``bake`` writes the code centres ``(codes - z) * s`` (divided by the folded
BatchNorm factor for a simulated Conv+BN) and checks that nearest rounding gives back exactly the chosen codes.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from mq_core.plugin_api import (
    CalibrationError,
    QATBnModule,
    QATModule,
    along_axis,
    bn_scale_factor,
    channel_view,
    quantize,
)

log = logging.getLogger(__name__)

#: The rectified sigmoid's stretch (Nagel et al. 2020): h(V) = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1).
ZETA, GAMMA = 1.1, -0.1
#: nextafter steps tried per weight when float error makes a baked weight round to a neighbouring code.
_MAX_NUDGES = 16


def _bn_factor(layer: QATModule) -> torch.Tensor | None:
    """The per-weight factor the weight quantizer's input carries on top of ``layer.weight`` (folded BN)."""
    if isinstance(layer, QATBnModule):
        return channel_view(bn_scale_factor(layer.bn), layer).detach()
    return None


class AdaRoundWeight(nn.Module):
    """Soft (training) and hard rounding of one layer's deploy weight on its quantizer's fixed grid.

    ``w' = s (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)``. ``V`` starts where ``h(V)`` equals the
    fractional part of ``w / s`` (so the soft weight starts at the float weight); the hard rounding is
    ``1[V >= 0]``. The layer's weight does not change during reconstruction, so ``floor(w / s)`` is computed once
    and ``forward`` ignores its input.
    """

    def __init__(self, layer: QATModule) -> None:
        super().__init__()
        fq = layer.weight_fake_quant
        weight = layer.deploy_weight_and_bias()[0].detach()
        axis = fq.ch_axis
        self.qmin, self.qmax = fq.scheme.qmin, fq.scheme.qmax
        self.register_buffer("scale", along_axis(fq.scale, weight, axis).to(weight.dtype))
        self.register_buffer("zero_point", along_axis(fq.zero_point, weight, axis).to(weight.dtype))
        scaled = weight / self.scale
        self.register_buffer("base", torch.floor(scaled))
        frac = (scaled - self.base).clamp(0.0, 1.0)
        # A channel whose BN factor is 0 has a deploy weight of 0 whatever the layer weight: its codes are fixed.
        factor = _bn_factor(layer)
        fixed = torch.zeros_like(weight, dtype=torch.bool) if factor is None else (factor == 0).expand_as(weight)
        self.register_buffer("learnable", ~fixed)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0))
        self.soft = True

    def soft_rounding(self) -> torch.Tensor:
        """h(V), the rectified sigmoid in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def rounding(self) -> torch.Tensor:
        """h(V) (soft) or 1[V >= 0] (hard); 0 for weights whose codes are fixed."""
        h = self.soft_rounding() if self.soft else (self.alpha >= 0).to(self.base.dtype)
        return h * self.learnable

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): pushes every h to 0 or 1 as beta decreases."""
        h = self.soft_rounding()
        return ((1.0 - (2.0 * h - 1.0).abs().pow(beta)) * self.learnable).sum()

    def soft_fraction(self, margin: float = 0.01) -> float:
        """Share of the learnable weights whose h(V) is not yet within ``margin`` of 0 or 1 (annealing unfinished:
        their hard rounding was never optimised as such)."""
        with torch.no_grad():
            h = self.soft_rounding()
            soft = (h > margin) & (h < 1 - margin) & self.learnable
            return float(soft.sum()) / max(int(self.learnable.sum()), 1)

    def codes(self) -> torch.Tensor:
        """The integer codes of the hard rounding (as float)."""
        hard = (self.alpha.detach() >= 0).to(self.base.dtype) * self.learnable
        return torch.clamp(self.base + hard + self.zero_point, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.base.shape:
            raise CalibrationError(
                f"AdaRound expected a weight of shape {tuple(self.base.shape)}, got {tuple(x.shape)}."
            )
        q = torch.clamp(self.base + self.rounding() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def _deploy_codes(layer: QATModule) -> torch.Tensor:
    """The codes nearest rounding gives the layer's current deploy weight (what the deploy view stores)."""
    fq = layer.weight_fake_quant
    weight = layer.deploy_weight_and_bias()[0].detach()
    return quantize(weight, fq.scale, fq.zero_point, fq.scheme.qmin, fq.scheme.qmax, fq.ch_axis)


@torch.no_grad()
def bake(layer: QATModule, codes: torch.Tensor) -> None:
    """Set ``layer.weight`` so that its (unchanged, nearest-rounding) weight quantizer yields exactly ``codes``.

    Plain layers get ``(codes - z) * s``; a simulated Conv+BN, whose quantizer sees ``weight * factor``, gets
    ``(codes - z) * s / factor``. The division can land a weight a few ulps off its code centre, which is harmless
    (the centre is half a step from any rounding boundary), but the result is checked and, where float error
    still flips a code, the weight is nudged one ulp at a time towards the intended code.
    """
    fq = layer.weight_fake_quant
    axis = fq.ch_axis
    weight = layer.weight
    scale = along_axis(fq.scale, weight, axis).to(weight.dtype)
    zero_point = along_axis(fq.zero_point, weight, axis).to(weight.dtype)
    target = (codes - zero_point) * scale
    factor = _bn_factor(layer)
    new = target if factor is None else torch.where(factor == 0, weight, target / factor)
    weight.copy_(new.to(weight.dtype))
    for _ in range(_MAX_NUDGES):
        got = _deploy_codes(layer)
        wrong = got != codes
        if not wrong.any():
            return
        # Raise the deploy weight where the code came out low; through a negative BN factor that lowers the weight.
        direction = torch.sign(codes - got) * (1.0 if factor is None else torch.sign(factor))
        nudged = torch.nextafter(weight, torch.where(direction > 0, math.inf, -math.inf).to(weight.dtype))
        weight.copy_(torch.where(wrong, nudged, weight))
    wrong = int((_deploy_codes(layer) != codes).sum())
    if wrong:
        raise CalibrationError(
            f"could not bake the learned rounding of {fq.qname}: {wrong} weight(s) do not round back to their code "
            "(a folded BatchNorm factor too small or too large for float32?)."
        )
