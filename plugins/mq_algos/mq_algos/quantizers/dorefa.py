"""DoReFa weight quantization (Zhou et al., 2016), with an exact export through ``bake``.

DoReFa squashes the weights before quantizing them, ``w' = tanh(w) / max|tanh(w)|`` in [-1, 1] (paper eq. 9),
so a few large weights do not stretch the grid, and quantizes ``w'`` with the straight-through estimator (the
gradient flows through ``tanh`` and the normalisation, not through the rounding).

Grid: the paper maps ``w'`` to ``2^k`` levels over [-1, 1] (``2 quantize_k(w'/2 + 1/2) - 1``). Those levels have
no zero and sit half a step off any integer zero point, so no runtime's ``(q - z) * s`` grid holds them. mq maps
``w'`` onto the signed grid with ``z = 0`` and ``s = 1 / qmax``: ``w_q = round(w' qmax) / qmax``, levels
``-qmax .. qmax`` (``2^k - 1`` of them, zero included; a full-range grid's extra ``qmin`` level is never used).
Only signed grids are accepted.

BatchNorm: the normalisation discards the weight's scale, so a BN fold factor applied before DoReFa would vanish
(and dividing by it afterwards, as the Jacob et al. fold does, made BN's running variance diverge). The quantizer
declares ``normalizes_input`` and the QAT BN layers fold *after* it (``mq_core.nn.qat``): training feeds the
DoReFa weight to the BN, as the paper does, and the deploy weight is the DoReFa weight times the fold factor, on
the per-channel grid ``|factor| / qmax``. A BN layer therefore needs a per-channel weight grid.

Export: the deploy view quantizes the layer's *stored* (BN-folded) weight with fixed qparams, and
``round(tanh(w) qmax / max|tanh(w)|)`` is not a uniform grid over ``w``: no fixed (scale, zero point) reproduces
it. ``bake(owner)`` (or ``bake_dorefa(model)`` for a whole model) therefore rewrites the owning layer's weight to
the DoReFa output itself, after which the quantizer is a plain fixed quantizer with ``s = 1 / qmax, z = 0`` (with
a BN: ``s = |factor| / qmax``, the folded grid): the new weight's codes are exactly the DoReFa codes, so the baked
model's eval output equals the trained model's, and the deploy view (and every export) equals the baked model's.
Bake once, after training (with BN frozen or in eval: the fold uses the running statistics); exporting an
unbaked DoReFa quantizer raises ``ExportError``.
"""

from __future__ import annotations

import torch
from torch import nn

from mq_core.plugin_api import (
    CalibrationError,
    ExportError,
    FakeQuantizer,
    Observer,
    QATBnModule,
    QuantScheme,
    SchemeError,
    bn_scale_factor,
    channels_first,
    fake_quantize,
)


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

    @property
    def normalizes_input(self) -> bool:
        """Until baked: ``max|tanh(w)|`` normalises any weight scale away (a BN fold must come after it)."""
        return not self.is_baked

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """The grid is fixed (``1 / qmax``, 0); calibration only supplies the per-channel shape. Once baked, the
        grid is the deploy grid ``bake`` chose, and a later calibration leaves it as it is."""
        if self.is_baked:
            scale, zero_point = self.scale, self.zero_point
        else:
            scale, zero_point = torch.full_like(scale, 1.0 / self.scheme.qmax), torch.zeros_like(zero_point)
        super().set_qparams(scale, zero_point)

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
        """Store this quantizer's current output as ``owner.weight`` and switch to the fixed grid that the
        deploy view then applies to the (BN-folded) stored weight: ``1 / qmax``, or with a BN the folded grid
        ``owner.folded_weight_qparams`` that the unbaked eval path already quantizes onto."""
        if owner.weight_fake_quant is not self:
            raise ValueError(f"{type(owner).__name__} does not own DoReFa quantizer {self.qname}.")
        if self.is_baked:
            return
        if not self.is_calibrated:
            raise CalibrationError(f"DoReFa quantizer {self.qname} was never calibrated; run mq.calibrate first.")
        owner.weight.copy_(self.quantize_forward(owner.weight))
        if isinstance(owner, QATBnModule):
            FakeQuantizer.set_qparams(self, *owner.folded_weight_qparams(bn_scale_factor(owner.bn)))
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
