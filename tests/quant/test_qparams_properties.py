"""Property tests of the qparams math (hypothesis): for any grid and any calibrated range, the quantizer keeps codes
on the grid, moves a value inside its representable range by at most half a step, represents 0 exactly, and a
symmetric grid has zero point 0. Both arithmetic paths (exact and torch's fast kernels) are checked."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mq_core import QuantScheme
from mq_core.quant.functional import fake_quantize, quantize

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                   width=32)


@st.composite
def schemes(draw: st.DrawFn) -> QuantScheme:
    signed = draw(st.booleans())
    return QuantScheme(draw(st.integers(2, 16)), signed=signed, symmetric=draw(st.booleans()),
                       narrow_range=signed and draw(st.booleans()), pot_scale=draw(st.booleans()))


@st.composite
def calibrated(draw: st.DrawFn) -> tuple[QuantScheme, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scheme, per-channel qparams from random ranges, and values spread over each channel's representable range
    (its ends included)."""
    scheme = draw(schemes())
    channels = draw(st.integers(1, 3))
    bounds = [sorted(draw(st.tuples(finite, finite))) for _ in range(channels)]
    scale, zero_point = scheme.qparams(torch.tensor([b[0] for b in bounds]), torch.tensor([b[1] for b in bounds]))
    lo, hi = scheme.range_of(scale, zero_point)
    fractions = torch.tensor([*draw(st.lists(st.floats(0, 1), min_size=1, max_size=16)), 0.0, 1.0])
    x = lo[:, None] + fractions[None, :] * (hi - lo)[:, None]
    x = torch.minimum(torch.maximum(x, lo[:, None]), hi[:, None])  # float rounding must not leave the range
    return scheme, scale, zero_point, x


@settings(max_examples=300, deadline=None)
@given(calibrated())
def test_scale_is_positive_and_finite_and_symmetric_means_zero_point_zero(case) -> None:
    scheme, scale, zero_point, _ = case
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zero_point >= scheme.qmin) & (zero_point <= scheme.qmax)).all()
    if scheme.symmetric:
        assert (zero_point == 0).all()


@settings(max_examples=300, deadline=None)
@given(calibrated(), st.lists(finite, min_size=1, max_size=8))
def test_codes_stay_on_the_grid_for_any_input(case, extra: list[float]) -> None:
    scheme, scale, zero_point, x = case
    wild = torch.cat([x, torch.tensor(extra).expand(x.shape[0], -1)], dim=1)  # values far outside the range too
    codes = quantize(wild, scale, zero_point, scheme.qmin, scheme.qmax, axis=0)
    assert ((codes >= scheme.qmin) & (codes <= scheme.qmax)).all()
    assert torch.equal(codes, torch.round(codes))


@settings(max_examples=300, deadline=None)
@given(calibrated(), st.booleans())
def test_error_inside_the_range_is_at_most_half_a_step(case, exact: bool) -> None:
    scheme, scale, zero_point, x = case
    out = fake_quantize(x, scale, zero_point, scheme.qmin, scheme.qmax, axis=0, exact=exact)
    half_step = scale[:, None] / 2
    slack = 1e-5 * half_step + 4 * torch.finfo(torch.float32).eps * x.abs()  # float32 arithmetic, not the grid
    assert ((out - x).abs() <= half_step + slack).all()


@settings(max_examples=300, deadline=None)
@given(calibrated(), st.booleans())
def test_zero_is_exactly_representable(case, exact: bool) -> None:
    scheme, scale, zero_point, _ = case
    zeros = torch.zeros(scale.shape[0], 4)
    assert torch.equal(fake_quantize(zeros, scale, zero_point, scheme.qmin, scheme.qmax, axis=0, exact=exact), zeros)
