"""DoReFa weight quantization (Zhou et al., 2016), with an exact export through ``bake``.

DoReFa squashes the weights before quantizing them, ``w' = tanh(w) / max|tanh(w)|`` in [-1, 1] (paper eq. 9),
so a few large weights do not stretch the grid, and quantizes ``w'`` with the straight-through estimator (the
gradient flows through ``tanh`` and the normalisation, not through the rounding).

Grid: the paper maps ``w'`` to ``2^k`` levels over [-1, 1] (``2 quantize_k(w'/2 + 1/2) - 1``). Those levels have
no zero and sit half a step off any integer zero point, so no runtime's ``(q - z) * s`` grid holds them. mq maps
``w'`` onto the signed grid with ``z = 0`` and ``s = 1 / qmax``: ``w_q = round(w' qmax) / qmax``, levels
``-qmax .. qmax`` (``2^k - 1`` of them, zero included; a full-range grid's extra ``qmin`` level is never used).
Only signed grids are accepted.

Export: the deploy view quantizes the layer's *stored* (BN-folded) weight with fixed qparams, and
``round(tanh(w) qmax / max|tanh(w)|)`` is not a uniform grid over ``w``: no fixed (scale, zero point) reproduces
it. ``bake(owner)`` (or ``bake_dorefa(model)`` for a whole model) therefore rewrites the owning layer's weight to
the DoReFa output itself, after which the quantizer is a plain fixed quantizer with ``s = 1 / qmax, z = 0``: the
new weight's codes are exactly the DoReFa codes, so the baked model's eval output equals the trained model's,
and the deploy view (and every export) equals the baked model's. Bake once, after training (with BN frozen or
in eval: the fold uses the running statistics); exporting an unbaked DoReFa quantizer raises ``ExportError``.
"""

from __future__ import annotations

import torch
from torch import nn

from mq_core.errors import CalibrationError, ExportError, SchemeError
from mq_core.nn.bn_fold import bn_scale_factor
from mq_core.nn.bn_fold import channel_view as output_channel_view
from mq_core.nn.qat import QATBnModule
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import fake_quantize
from mq_core.quant.observers.base import Observer, channels_first
from mq_core.quant.scheme import QuantScheme


class DoReFaFakeQuantizer(FakeQuantizer):
    """DoReFa's ``tanh`` normalisation followed by the signed grid ``s = 1 / qmax, z = 0`` (module docstring).

    The normalisation ``max|tanh(w)|`` is per tensor, or per channel when the scheme is per-channel. It has no
    learnable parameters: the weights learn.
    """

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True) -> None:
        if not scheme.signed or scheme.pot_scale:
            raise SchemeError(
                f"DoReFa quantizes weights onto a signed grid with scale 1/qmax; {scheme.describe()} is not one "
                "(use it for weights of a signed, non power-of-two grid)."
            )
        super().__init__(scheme, observer, exact)
        self.register_buffer("baked", torch.tensor(0, dtype=torch.uint8))

    @property
    def is_baked(self) -> bool:
        return bool(self.baked.item())

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """The grid is fixed (``1 / qmax``, 0); calibration only supplies the per-channel shape."""
        super().set_qparams(torch.full_like(scale, 1.0 / self.scheme.qmax), torch.zeros_like(zero_point))

    def transform(self, w: torch.Tensor) -> torch.Tensor:
        """``tanh(w) / max|tanh(w)|`` (per channel when per-channel); an all-zero tensor stays zero."""
        t = torch.tanh(w)
        if self.ch_axis is None:
            peak = t.abs().max()
        else:
            shape = [1] * w.dim()
            shape[self.ch_axis] = -1
            peak = channels_first(t.abs(), self.ch_axis).amax(dim=1).reshape(shape)
        return t / torch.clamp(peak, min=torch.finfo(t.dtype).tiny)

    def quantize_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x if self.is_baked else self.transform(x)
        return fake_quantize(w, self.scale, self.zero_point, self.scheme.qmin, self.scheme.qmax, self.ch_axis,
                             self.exact)

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_baked:
            raise ExportError(
                f"DoReFa quantizer {self.qname} is not baked: its tanh normalisation is no fixed grid over the "
                "stored weight. Call mq_algos.quantizers.dorefa.bake_dorefa(qmodel) after training, then export."
            )
        return super().export_qparams()

    @torch.no_grad()
    def bake(self, owner: nn.Module) -> None:
        """Rewrite ``owner.weight`` so that its deploy (BN-folded) weight is this quantizer's current output."""
        if owner.weight_fake_quant is not self:
            raise ValueError(f"{type(owner).__name__} does not own DoReFa quantizer {self.qname}.")
        if self.is_baked:
            return
        if not self.is_calibrated:
            raise CalibrationError(f"DoReFa quantizer {self.qname} was never calibrated; run mq.calibrate first.")
        target = self.quantize_forward(owner.deploy_weight_and_bias()[0])
        if isinstance(owner, QATBnModule):
            # deploy weight = weight * factor per output channel (mq_core.nn.bn_fold.fold_weight); invert it. A
            # channel with factor 0 deploys zeros whatever its weight, and DoReFa maps zeros to code 0.
            factor = output_channel_view(bn_scale_factor(owner.bn), owner)
            target = torch.where(factor != 0, target / factor, torch.zeros_like(target))
        owner.weight.copy_(target)
        self.baked.fill_(1)


def bake_dorefa(model: nn.Module) -> int:
    """Bake every quantizing DoReFa weight quantizer of a trained prepared model (see the module docstring);
    returns how many were baked. Call it after the last training step, before ``mq.export``. A quantizer with
    quantization switched off is left alone: its layer runs and exports in float."""
    baked = 0
    for module in model.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if isinstance(fq, DoReFaFakeQuantizer) and fq.quant_enabled.item() and not fq.is_baked:
            fq.bake(module)
            baked += 1
    return baked
