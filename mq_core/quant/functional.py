"""Fake quantization arithmetic, in two flavours that agree except at rounding ties.

* ``exact``: ``q = clamp(round(x / s) + z)``, dividing by the scale exactly as ONNX Runtime, TVM and the ONNX
  spec do, so the simulation is bit-identical to those runtimes.
* fast: torch's fused ``fake_quantize_per_*_affine`` kernels, which multiply by ``1 / s``; a value within a float
  ulp of a .5 tie can land one step away from the runtime's answer. Use it for QAT speed.

Both use round-half-to-even and the straight-through estimator with the clipping mask (gradient 1 inside the
representable range, 0 outside).
"""

from __future__ import annotations

import torch


def along_axis(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``param`` (a scalar, or one value per channel) shaped to broadcast against ``x`` along ``axis``; shared by
    every quantizer so that per-channel qparams line up with the same axis everywhere."""
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """Integer codes (as float) of ``x``: ``clamp(round(x / s) + z, qmin, qmax)``."""
    s = along_axis(scale, x, axis)
    z = along_axis(zero_point, x, axis).to(x.dtype)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    s = along_axis(scale, q, axis)
    z = along_axis(zero_point, q, axis).to(s.dtype)
    return (q.to(s.dtype) - z) * s


class _ExactFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        s = along_axis(scale, x, axis)
        z = along_axis(zero_point, x, axis).to(x.dtype)
        q = torch.round(x / s) + z
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    exact: bool = True,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid [qmin, qmax]; per-channel along ``axis`` when it is given."""
    if exact or x.dtype != torch.float32:
        return _ExactFakeQuantize.apply(x, scale, zero_point, qmin, qmax, axis)
    zp = zero_point.to(torch.int32)
    if axis is None or scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
