"""QuantScheme: the integer grid a tensor is mapped to, and the one place that turns a range into qparams.

Conventions (see docs/design.md for why they differ slightly from torch.ao):

* symmetric: ``z = 0`` and ``s = amax / qmax``, so ``amax`` lands exactly on the largest positive level. A signed
  full-range tensor keeps ``qmin = -2**(b-1)`` as a spare level. This is TensorRT's and ONNX Runtime's rule and
  makes TensorRT's dynamic range ``amax = 127 * s`` exact.
* affine: the range is widened to include 0, ``s = (hi - lo) / (qmax - qmin)``,
  ``z = clamp(qmin - round(lo / s), qmin, qmax)``.
* power-of-two: ``s = 2 ** round(log2 s)``, zero point recomputed for the rounded scale.
* a zero-width range gives ``s = float32 eps``, never 0 or NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mq_core.errors import SchemeError

#: Smallest scale ever produced; keeps x / s finite for all-zero tensors.
SCALE_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class QuantScheme:
    """An integer grid: bit width, signedness, symmetry, granularity and scale restrictions."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    ch_axis: int = 0
    narrow_range: bool = False
    pot_scale: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise SchemeError(f"QuantScheme bits must be an integer from 2 to 16, got {self.bits!r}.")
        if self.narrow_range and not self.signed:
            raise SchemeError("narrow_range applies to signed grids only ([-2^(b-1)+1, 2^(b-1)-1]).")

    # --- the grid -------------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The narrowest standard integer type holding the grid (what ONNX Q/DQ nodes carry)."""
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        return torch.int16 if self.signed else torch.uint16

    def replace(self, **changes: Any) -> QuantScheme:
        return dataclasses.replace(self, **changes)

    # --- range -> qparams -----------------------------------------------------------------------------------
    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int32) for the range [lo, hi]; same shape as ``lo``."""
        lo = torch.as_tensor(lo, dtype=torch.float32)
        hi = torch.as_tensor(hi, dtype=torch.float32)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise SchemeError("cannot compute qparams from a non-finite range; check the calibration data.")
        zero = torch.zeros_like(lo)
        lo = torch.minimum(lo, zero)
        hi = torch.maximum(hi, zero)
        # The divisor is a tensor on the range's device: CUDA computes ``tensor / python_number`` as a multiplication
        # by the reciprocal, one ulp away from the CPU's division, and the qparams must not depend on the device.
        if self.symmetric:
            amax = hi if not self.signed else torch.maximum(-lo, hi)
            scale = amax / torch.full_like(amax, self.qmax)
        else:
            scale = (hi - lo) / torch.full_like(hi, self.qmax - self.qmin)
        scale = torch.clamp(scale, min=SCALE_EPS)
        if self.pot_scale:
            scale = torch.clamp(torch.exp2(torch.round(torch.log2(scale))), min=SCALE_EPS)
        if self.symmetric:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            zero_point = torch.clamp(self.qmin - torch.round(lo / scale), self.qmin, self.qmax).to(torch.int32)
        return scale.to(torch.float32), zero_point

    def range_of(self, scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The representable float range [(qmin - z) s, (qmax - z) s] of given qparams."""
        z = zero_point.to(torch.float32)
        return (self.qmin - z) * scale, (self.qmax - z) * scale

    # --- description ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Short human form, e.g. ``int8 sym per-channel(0) narrow``."""
        parts = [f"{'int' if self.signed else 'uint'}{self.bits}", "sym" if self.symmetric else "affine"]
        parts.append(f"per-channel({self.ch_axis})" if self.per_channel else "per-tensor")
        if self.narrow_range:
            parts.append("narrow")
        if self.pot_scale:
            parts.append("pot")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "qmin": self.qmin, "qmax": self.qmax}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


#: The common grids, named for readability in backend definitions.
INT8_SYM_PER_CHANNEL_NARROW = QuantScheme(8, signed=True, symmetric=True, per_channel=True, narrow_range=True)
INT8_SYM_PER_CHANNEL = QuantScheme(8, signed=True, symmetric=True, per_channel=True)
INT8_SYM = QuantScheme(8, signed=True, symmetric=True)
UINT8_SYM = QuantScheme(8, signed=False, symmetric=True)
UINT8_AFFINE = QuantScheme(8, signed=False, symmetric=False)
