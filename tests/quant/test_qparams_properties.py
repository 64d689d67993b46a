"""Property tests of the qparams math (hypothesis): for any grid and any calibrated range, the quantizer keeps codes
on the grid, moves a value inside its representable range by at most half a step, represents 0 exactly, and a
symmetric grid has zero point 0. Both arithmetic paths (exact and torch's fast kernels) are checked."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
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


#: The strategies run torch code (qparams), which a loaded CI machine can make slow; that is not a failure.
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def calibrated(draw: st.DrawFn) -> tuple[QuantScheme, torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """A scheme, qparams from random ranges, values spread over each channel's representable range (its ends
    included), and the channel axis: per-channel along axis 0 ([C] qparams), or per-tensor (0-d qparams, axis
    None), so that both kernels of the fast path and both shapes of the exact path are exercised."""
    scheme = draw(schemes())
    per_tensor = draw(st.booleans())
    channels = 1 if per_tensor else draw(st.integers(1, 3))
    bounds = [sorted(draw(st.tuples(finite, finite))) for _ in range(channels)]
    scale, zero_point = scheme.qparams(torch.tensor([b[0] for b in bounds]), torch.tensor([b[1] for b in bounds]))
    lo, hi = scheme.range_of(scale, zero_point)
    fractions = torch.tensor([*draw(st.lists(st.floats(0, 1), min_size=1, max_size=16)), 0.0, 1.0])
    x = lo[:, None] + fractions[None, :] * (hi - lo)[:, None]
    x = torch.minimum(torch.maximum(x, lo[:, None]), hi[:, None])  # float rounding must not leave the range
    if per_tensor:
        return scheme, scale.reshape(()), zero_point.reshape(()), x, None
    return scheme, scale, zero_point, x, 0


def per_row(values: torch.Tensor, axis: int | None) -> torch.Tensor:
    return values if axis is None else values[:, None]


@SETTINGS
@given(calibrated())
def test_scale_is_positive_and_finite_and_symmetric_means_zero_point_zero(case) -> None:
    scheme, scale, zero_point, _, _ = case
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zero_point >= scheme.qmin) & (zero_point <= scheme.qmax)).all()
    if scheme.symmetric:
        assert (zero_point == 0).all()


@SETTINGS
@given(calibrated(), st.lists(finite, min_size=1, max_size=8), st.booleans())
def test_codes_stay_on_the_grid_for_any_input(case, extra: list[float], exact: bool) -> None:
    scheme, scale, zero_point, x, axis = case
    wild = torch.cat([x, torch.tensor(extra).expand(x.shape[0], -1)], dim=1)  # values far outside the range too
    codes = quantize(wild, scale, zero_point, scheme.qmin, scheme.qmax, axis=axis)
    assert ((codes >= scheme.qmin) & (codes <= scheme.qmax)).all()
    assert torch.equal(codes, torch.round(codes))
    # The fake-quantized values (either path) are exactly those codes dequantized: on the grid too.
    out = fake_quantize(wild, scale, zero_point, scheme.qmin, scheme.qmax, axis=axis, exact=exact)
    z = per_row(zero_point, axis).to(out.dtype)
    on_grid = torch.round(out / per_row(scale, axis)) + z
    assert ((on_grid >= scheme.qmin) & (on_grid <= scheme.qmax)).all()


@SETTINGS
@given(calibrated(), st.booleans())
def test_error_inside_the_range_is_at_most_half_a_step(case, exact: bool) -> None:
    scheme, scale, zero_point, x, axis = case
    out = fake_quantize(x, scale, zero_point, scheme.qmin, scheme.qmax, axis=axis, exact=exact)
    half_step = per_row(scale, axis) / 2
    slack = 1e-5 * half_step + 4 * torch.finfo(torch.float32).eps * x.abs()  # float32 arithmetic, not the grid
    assert ((out - x).abs() <= half_step + slack).all()


@SETTINGS
@given(calibrated(), st.booleans())
def test_zero_is_exactly_representable(case, exact: bool) -> None:
    scheme, scale, zero_point, x, axis = case
    zeros = torch.zeros_like(x)
    assert torch.equal(fake_quantize(zeros, scale, zero_point, scheme.qmin, scheme.qmax, axis=axis, exact=exact),
                       zeros)
