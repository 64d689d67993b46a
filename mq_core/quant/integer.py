"""The integer arithmetic of a runtime's quantized kernels, reproduced in torch bit for bit.

The default simulation computes a convolution in float32 on dequantized values and rounds the result once; a runtime
with integer kernels (ONNX Runtime with its graph optimisations on: ``QLinearConv``, ``QGemm``, ``QLinearAdd``)
sums integer products exactly and rounds through its own float32 requantisation. The two differ by one step on the
few values that land near a rounding boundary, and the flips grow with depth. These functions compute what ONNX
Runtime's CPU kernels (MLAS, x86) compute, so that ``mq_core.graph.integer_sim`` can run a prepared model the way
the runtime does:

* ``QLinearConv`` / ``QGemm``: ``acc = sum((x_q - x_z) * (w_q - w_z)) + bias_q`` in int32, then
  ``clamp(round_half_even(float32(acc) * m) + y_z)`` with the float32 multiplier ``m = (x_s * w_s) / y_s``
  (per output channel), rounded as ONNX Runtime rounds it. ``bias_q = round_half_even(bias / (x_s * w_s))`` in
  float32: how ONNX Runtime quantizes a float bias when it fuses the QDQ group (its ``WeightBiasQuantization``
  pass; mq exports the bias in float).
* ``QLinearAdd`` (AVX2 kernel): ``r_a = a_s / c_s``, ``r_b = b_s / c_s``, ``f = c_z - (r_a * a_z + r_b * b_z)``;
  ``round_half_even(fma(a_q, r_a, fma(b_q, r_b, f)))`` saturated. The two fused multiply-adds round once each,
  which float64 reproduces (the products of 8-bit codes and float32 ratios are exact in float64).

Sums are computed on integer-valued float64 tensors: every product and partial sum is an integer below 2^53, so
the result is exact whatever order torch sums in.
"""

from __future__ import annotations

import torch

from mq_core.quant.functional import along_axis


def codes_of(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integer codes, centred on the zero point (``q - z``, as float64), of values that already lie on a
    per-tensor grid (a fake quantizer's output, or a pass-through op of one): ``(q - z) * s / s`` rounds back to
    ``q - z``."""
    return torch.round(x.to(torch.float32) / scale.to(torch.float32).reshape(())).to(torch.float64)


def requantize_multiplier(x_scale: torch.Tensor, w_scale: torch.Tensor, y_scale: torch.Tensor) -> torch.Tensor:
    """``(x_s * w_s) / y_s`` in float32, one value per weight scale: ONNX Runtime's ``ComputeOutputScale``."""
    return (x_scale.to(torch.float32) * w_scale.to(torch.float32)) / y_scale.to(torch.float32)


def quantize_bias(bias: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``round_half_even(bias / (x_s * w_s))`` in float32 (as float64 integers): the int32 bias ONNX Runtime's QDQ
    fusion computes from a float bias (Mul, Div, Round, Cast, constant-folded)."""
    bias_scale = x_scale.to(torch.float32) * w_scale.to(torch.float32)
    return torch.round(bias.to(torch.float32) / bias_scale).to(torch.float64)


def requantize(
    acc: torch.Tensor, multiplier: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int
) -> torch.Tensor:
    """Integer accumulators (float64 integers) to output codes (float32): ``clamp(round_half_even(float32(acc) *
    multiplier) + z)``, the multiplier per channel along ``axis`` (MLAS ``MlasRequantizeOutput``)."""
    scaled = acc.to(torch.float32) * along_axis(multiplier, acc, axis if multiplier.numel() > 1 else None)
    z = float(zero_point.item())
    return torch.clamp(torch.round(scaled), qmin - z, qmax - z) + z


def _fma32(a: torch.Tensor, b: float, c: torch.Tensor | float) -> torch.Tensor:
    """``a * b + c`` rounded once to float32, as a fused multiply-add: the product of an 8-bit code and a float32
    is exact in float64, and so is the sum unless the two differ in magnitude by more than about 2^21 (then float64
    rounds first, which can differ from the hardware in the last bit of a tie; not seen on quantized networks)."""
    return (a.to(torch.float64) * b + c).to(torch.float32)


def qlinear_add(
    a: torch.Tensor, a_qparams: tuple[torch.Tensor, torch.Tensor], b: torch.Tensor,
    b_qparams: tuple[torch.Tensor, torch.Tensor], c_qparams: tuple[torch.Tensor, torch.Tensor], qmin: int, qmax: int,
) -> torch.Tensor:
    """Output codes (float32) of ONNX Runtime's ``QLinearAdd`` of the code tensors ``a`` and ``b`` (integer valued,
    not centred); each qparams is a per-tensor ``(scale, zero_point)``."""
    (a_s, a_z), (b_s, b_z), (c_s, c_z) = ((s.to(torch.float32).reshape(()), float(z.item()))
                                          for s, z in (a_qparams, b_qparams, c_qparams))
    ratio_a, ratio_b = a_s / c_s, b_s / c_s
    fixed = float(torch.tensor(c_z, dtype=torch.float32) - (ratio_a * a_z + ratio_b * b_z))
    summed = _fma32(a, float(ratio_a), _fma32(b, float(ratio_b), fixed))
    return torch.clamp(torch.round(summed), qmin, qmax)
