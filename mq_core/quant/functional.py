"""Fake quantization arithmetic, in two flavours that agree except at rounding ties.

* ``exact``: ``q = clamp(round(x / s) + z)``, dividing by the scale exactly as ONNX Runtime, TVM and the ONNX
  spec do, so the simulation is bit-identical to those runtimes.
* fast: torch's fused ``fake_quantize_per_*_affine`` kernels, which multiply by ``1 / s``; a value within a float
  ulp of a .5 tie can land one step away from the runtime's answer. They were chosen for QAT speed, but on a CPU
  the exact path is now the faster of the two (``_ExactFakeQuantize``; not measured on a GPU).

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
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with the clipping-mask STE, in two fresh tensors.

    The arithmetic is the plain composition's, operation for operation, so values and gradients are bit-identical to
    it (and the values to the runtimes); what is fused is the memory traffic. On a CPU a large fresh tensor costs more
    than the arithmetic on it (first-touch page faults), and a ``bool`` mask multiplied into a float gradient is first
    copied to a float tensor. So the forward allocates only the output and the saved mask, doing the rest in place,
    and the mask is a float 0/1 tensor (written over the unclamped codes) that the backward multiplies in directly.
    That halved the fake quantizers' share of a ResNet-18 QAT step on a CPU (``benchmarks/qat_step.py``), for a mask
    of 4 bytes per element where a ``bool`` takes 1.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        s = along_axis(scale, x, axis)
        z = along_axis(zero_point, x, axis).to(x.dtype)
        q = torch.div(x, s).round_().add_(z)
        clamped = torch.clamp(q, qmin, qmax)
        ctx.save_for_backward(torch.eq(q, clamped, out=q))  # 1 inside the grid, 0 where clamped or NaN
        return clamped.sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


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
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            return _ExactFakeQuantize.apply(x, scale, zero_point, qmin, qmax, axis)
        # no gradient wanted (calibration, evaluation, export checks): the same operations, all in one fresh tensor
        s = along_axis(scale, x, axis)
        z = along_axis(zero_point, x, axis).to(x.dtype)
        return torch.div(x, s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    zp = zero_point.to(torch.int32)
    if axis is None or scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
