"""The two custom ops the deploy view is written in, and their ONNX translations.

``mq::quantize_dequantize`` (an activation quantizer) and ``mq::dequantize`` (a stored integer weight) are
``torch.library`` ops with fake kernels, so ``torch.export`` traces them with a symbolic batch dimension, and the
ONNX exporter's ``custom_translation_table`` turns them into QuantizeLinear/DequantizeLinear directly. This
sidesteps torch's own fake-quant export, which refuses narrow and sub-8-bit ranges.

Grids narrower than their storage type (4-bit in int8, narrow [-127, 127]) get an integer Clip between the
QuantizeLinear and the DequantizeLinear: ``Q -> Clip(qmin, qmax) -> DQ`` is literally ``clamp(round(x / s) + z)``, and
an integer Clip can never be merged with a float op of the model (a ReLU6) by graph optimisers.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from mq_core.quant.functional import dequantize as _dequantize
from mq_core.quant.functional import fake_quantize


@torch.library.custom_op("mq::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int, clip: bool,
) -> torch.Tensor:
    """Exact fake quantization (x / s, round half to even); ``axis < 0`` means per-tensor."""
    return fake_quantize(x, scale, zero_point.to(torch.int32), qmin, qmax, None if axis < 0 else axis, exact=True)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, clip):
    return torch.empty_like(x)


@torch.library.custom_op("mq::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """(q - z) * s for stored integer weights; ``axis < 0`` means per-tensor."""
    return _dequantize(q, scale, zero_point, None if axis < 0 else axis)


@dequantize.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty_like(q, dtype=torch.float32)


def _quantize_dequantize_onnx(x, scale, zero_point, qmin: int, qmax: int, axis: int, clip: bool):
    q = op.QuantizeLinear(x, scale, zero_point) if axis < 0 else op.QuantizeLinear(x, scale, zero_point, axis=axis)
    if clip:
        q = op.Clip(q, op.CastLike(op.Constant(value_int=qmin), zero_point),
                    op.CastLike(op.Constant(value_int=qmax), zero_point))
    return op.DequantizeLinear(q, scale, zero_point) if axis < 0 else op.DequantizeLinear(q, scale, zero_point,
                                                                                          axis=axis)


def _dequantize_onnx(q, scale, zero_point, axis: int):
    if axis < 0:
        return op.DequantizeLinear(q, scale, zero_point)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


TRANSLATIONS = {
    torch.ops.mq.quantize_dequantize.default: _quantize_dequantize_onnx,
    torch.ops.mq.dequantize.default: _dequantize_onnx,
}
