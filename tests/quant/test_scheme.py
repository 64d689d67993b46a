"""QuantScheme: integer grids and the range -> qparams math, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mq_core import QuantScheme, SchemeError
from mq_core.quant.scheme import SCALE_EPS


def qp(scheme: QuantScheme, lo: float | list[float], hi: float | list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return scheme.qparams(torch.tensor(lo), torch.tensor(hi))


# --- grids ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scheme", "qmin", "qmax", "dtype"),
    [
        (QuantScheme(2), -2, 1, torch.int8),
        (QuantScheme(2, signed=False), 0, 3, torch.uint8),
        (QuantScheme(4, narrow_range=True), -7, 7, torch.int8),
        (QuantScheme(8), -128, 127, torch.int8),
        (QuantScheme(8, narrow_range=True), -127, 127, torch.int8),
        (QuantScheme(8, signed=False), 0, 255, torch.uint8),
        (QuantScheme(12), -2048, 2047, torch.int16),
        (QuantScheme(16), -32768, 32767, torch.int16),
        (QuantScheme(16, signed=False), 0, 65535, torch.uint16),
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantScheme) else None,
)
def test_grid_bounds(scheme: QuantScheme, qmin: int, qmax: int, dtype: torch.dtype) -> None:
    assert (scheme.qmin, scheme.qmax) == (qmin, qmax)
    assert scheme.levels == qmax - qmin + 1
    assert scheme.storage_dtype == dtype


def test_every_bit_width_from_2_to_16() -> None:
    for bits in range(2, 17):
        assert (QuantScheme(bits).qmin, QuantScheme(bits).qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert QuantScheme(bits, narrow_range=True).qmin == -(2 ** (bits - 1)) + 1
        assert (QuantScheme(bits, signed=False).qmin, QuantScheme(bits, signed=False).qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [0, 1, 17, 32, 8.0, "8", None])
def test_invalid_bits_raise_scheme_error(bits: object) -> None:
    with pytest.raises(SchemeError, match="bits"):
        QuantScheme(bits)  # type: ignore[arg-type]


def test_scheme_error_is_a_value_error_and_narrow_unsigned_is_refused() -> None:
    with pytest.raises(ValueError, match="narrow_range"):
        QuantScheme(8, signed=False, narrow_range=True)


def test_scheme_is_immutable_and_replace_validates() -> None:
    scheme = QuantScheme(8)
    with pytest.raises(AttributeError):
        scheme.bits = 4  # type: ignore[misc]
    assert scheme.replace(bits=4).qmax == 7
    with pytest.raises(SchemeError):
        scheme.replace(bits=1)


def test_dict_round_trip_and_describe() -> None:
    scheme = QuantScheme(6, signed=True, symmetric=False, per_channel=True, ch_axis=1, pot_scale=True)
    data = scheme.to_dict()
    assert (data["qmin"], data["qmax"]) == (-32, 31)
    assert QuantScheme.from_dict(data) == scheme
    assert scheme.describe() == "int6 affine per-channel(1) pot"
    assert QuantScheme(8, narrow_range=True).describe() == "int8 sym per-tensor narrow"


# --- qparams by hand ------------------------------------------------------------------------------------------------
def test_symmetric_signed_scale_is_amax_over_qmax() -> None:
    scale, zp = qp(QuantScheme(8), -2.0, 1.0)
    assert scale.item() == pytest.approx(2.0 / 127, rel=1e-7)
    assert zp.item() == 0
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    # amax lands exactly on the largest level; the negative spare level -128 is unused by amax
    assert (scale * 127).item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(("bits", "narrow"), [(2, False), (4, False), (4, True), (8, True), (16, False)])
def test_symmetric_signed_any_width(bits: int, narrow: bool) -> None:
    scheme = QuantScheme(bits, narrow_range=narrow)
    scale, zp = qp(scheme, -0.5, 3.0)
    assert scale.item() == pytest.approx(3.0 / (2 ** (bits - 1) - 1), rel=1e-6)
    assert zp.item() == 0


def test_symmetric_unsigned_uses_the_positive_side_only() -> None:
    scale, zp = qp(QuantScheme(8, signed=False), -2.0, 3.0)
    assert scale.item() == pytest.approx(3.0 / 255, rel=1e-7)
    assert zp.item() == 0


@pytest.mark.parametrize(("signed", "qmin", "qmax"), [(False, 0, 255), (True, -128, 127)])
def test_affine_scale_and_zero_point(signed: bool, qmin: int, qmax: int) -> None:
    lo, hi = -1.0, 3.0
    scale, zp = qp(QuantScheme(8, signed=signed, symmetric=False), lo, hi)
    s = np.float32(hi - lo) / np.float32(qmax - qmin)
    assert scale.item() == pytest.approx(float(s), rel=1e-7)
    expected_zp = int(np.clip(qmin - np.round(np.float32(lo) / s), qmin, qmax))
    assert zp.item() == expected_zp == qmin + 64  # -1 / (4/255) = -63.75 -> -64
    # lo and hi are representable to within half a step
    lo_q, hi_q = QuantScheme(8, signed=signed, symmetric=False).range_of(scale, zp)
    assert abs(lo_q.item() - lo) <= scale.item() / 2 + 1e-7
    assert abs(hi_q.item() - hi) <= scale.item() / 2 + 1e-7


@pytest.mark.parametrize(("lo", "hi", "zp"), [(-1.1, 2.0, 90), (-0.25, 3.0, 20), (-2.9, 0.1, 246)])
def test_affine_zero_point_rounds_to_nearest(lo: float, hi: float, zp: int) -> None:
    scale, z = qp(QuantScheme(8, signed=False, symmetric=False), lo, hi)
    assert z.item() == zp  # -1.1 / (3.1 / 255) = -90.48 -> 90 (not 91); -0.25 / (3.25 / 255) = -19.6 -> 20
    assert z.item() == int(np.round(-np.float32(lo) / scale.numpy()))


def test_affine_4_bit() -> None:
    scale, zp = qp(QuantScheme(4, signed=False, symmetric=False), -0.3, 1.2)
    assert scale.item() == pytest.approx(1.5 / 15, rel=1e-6)
    assert zp.item() == 3  # 0 - round(-0.3 / 0.1)


@pytest.mark.parametrize(
    ("symmetric", "lo", "hi", "scale", "zp"),
    [
        (False, 1.0, 3.0, 3.0 / 255, 0),  # positive-only range widened down to 0
        (False, -3.0, -1.0, 3.0 / 255, 255),  # negative-only range widened up to 0: z at the top
        (True, 1.0, 3.0, 3.0 / 255, 0),
    ],
)
def test_range_is_widened_to_include_zero(symmetric: bool, lo: float, hi: float, scale: float, zp: int) -> None:
    s, z = qp(QuantScheme(8, signed=False, symmetric=symmetric), lo, hi)
    assert s.item() == pytest.approx(scale, rel=1e-6)
    assert z.item() == zp


def test_zero_is_exactly_representable_in_affine_grids() -> None:
    for lo, hi in ((-0.37, 2.9), (-5.0, 0.01), (-1e-3, 7.0)):
        scheme = QuantScheme(8, signed=False, symmetric=False)
        scale, zp = qp(scheme, lo, hi)
        q = torch.clamp(torch.round(torch.tensor(0.0) / scale) + zp, scheme.qmin, scheme.qmax)
        assert ((q - zp) * scale).item() == 0.0


def test_per_channel_qparams_are_elementwise() -> None:
    lo, hi = [-1.0, 0.0, -4.0, 0.0], [2.0, 0.5, 1.0, 0.0]
    scale, zp = qp(QuantScheme(8, per_channel=True, ch_axis=1), lo, hi)
    assert scale.shape == (4,) and zp.shape == (4,)
    assert scale[:3].tolist() == pytest.approx([2.0 / 127, 0.5 / 127, 4.0 / 127], rel=1e-6)
    assert scale[3].item() == SCALE_EPS
    assert zp.tolist() == [0, 0, 0, 0]
    scale, zp = qp(QuantScheme(8, signed=False, symmetric=False, per_channel=True), lo, hi)
    assert scale[:3].tolist() == pytest.approx([3.0 / 255, 0.5 / 255, 5.0 / 255], rel=1e-6)
    assert zp[:3].tolist() == [85, 0, 204]  # round(1 / (3/255)) = 85, round(4 / (5/255)) = 204


@pytest.mark.parametrize(
    ("scheme", "lo", "hi", "scale", "zp"),
    [
        (QuantScheme(8, pot_scale=True), -1.0, 1.0, 2.0**-7, 0),  # 1/127 -> 2^-6.99 -> 2^-7
        (QuantScheme(8, pot_scale=True), -3.0, 0.5, 2.0**-5, 0),  # 3/127 = 2^-5.41 -> 2^-5
        (QuantScheme(8, signed=False, symmetric=False, pot_scale=True), -1.0, 3.0, 2.0**-6, 64),
    ],
)
def test_power_of_two_scale(scheme: QuantScheme, lo: float, hi: float, scale: float, zp: int) -> None:
    s, z = qp(scheme, lo, hi)
    assert s.item() == scale
    assert math.log2(s.item()).is_integer()
    assert z.item() == zp  # zero point recomputed for the rounded scale: -1 / 2^-6 = -64


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(8),
        QuantScheme(8, signed=False),
        QuantScheme(8, signed=False, symmetric=False),
        QuantScheme(8, symmetric=False),
        QuantScheme(4, pot_scale=True),
        QuantScheme(8, signed=False, symmetric=False, pot_scale=True),
    ],
    ids=QuantScheme.describe,
)
def test_all_zero_range_gives_a_tiny_positive_scale(scheme: QuantScheme) -> None:
    scale, zp = qp(scheme, 0.0, 0.0)
    assert torch.isfinite(scale).all() and scale.item() > 0
    assert scale.item() == pytest.approx(SCALE_EPS)
    assert scheme.qmin <= zp.item() <= scheme.qmax
    zeros = torch.zeros(5)
    q = torch.clamp(torch.round(zeros / scale) + zp, scheme.qmin, scheme.qmax)
    out = (q - zp) * scale
    assert torch.equal(out, zeros)


def test_non_finite_range_is_refused() -> None:
    with pytest.raises(SchemeError, match="non-finite"):
        qp(QuantScheme(8), float("nan"), 1.0)
    with pytest.raises(SchemeError, match="non-finite"):
        qp(QuantScheme(8, symmetric=False), -1.0, float("inf"))
