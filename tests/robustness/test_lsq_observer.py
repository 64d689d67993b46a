"""The LSQ observer on affine grids never hands out a range that clips every positive value (issue 10, point 18).

LSQ's step size ``2 mean|x| / sqrt(qmax)`` ignores the extremes; the zero point that puts the minimum on ``qmin``
was clamped into the grid, so data with a long negative tail got the range ``[lo, 0]``.
"""

from __future__ import annotations

import math

import pytest
import torch

import mq_core as mq
from mq_core.quant.scheme import QuantScheme

UINT4_AFFINE = QuantScheme(4, signed=False, symmetric=False)
UINT8_AFFINE = QuantScheme(8, signed=False, symmetric=False)


def long_negative_tail(n: int = 990) -> torch.Tensor:
    """Mostly values in [0, 1], and a tail down to -40: far beyond what LSQ's step covers on 4 or 8 bits."""
    torch.manual_seed(0)
    return torch.cat([torch.rand(n), -torch.linspace(0.5, 40.0, 10)])


def lsq_qparams(scheme: QuantScheme, x: torch.Tensor) -> tuple[float, int]:
    observer = mq.get_observer("lsq")(scheme)
    observer(x)
    scale, z = observer.calculate_qparams()
    assert scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(scheme.qmax), rel=1e-5)
    assert scheme.qmin <= int(z) <= scheme.qmax
    return scale.item(), int(z)


@pytest.mark.parametrize("scheme", [UINT4_AFFINE, UINT8_AFFINE], ids=["uint4", "uint8"])
def test_positive_side_is_covered_when_only_the_negative_tail_overflows(scheme: QuantScheme) -> None:
    x = long_negative_tail()  # uint4: s = 0.36, [0, 1] needs 3 of the 15 steps, [-40, 0] 111; uint8: 11, 456 of 255
    s, z = lsq_qparams(scheme, x)
    lo, hi = (scheme.qmin - z) * s, (scheme.qmax - z) * s
    assert hi > 0, f"range [{lo:.3g}, {hi:.3g}] clips every positive value to 0"
    assert abs(hi - x.max().item()) <= s / 2  # every positive value is on the grid, with no level to spare
    assert lo == pytest.approx(-(scheme.qmax - scheme.qmin) * s + hi)  # the tail gets all the rest


def test_two_overflowing_sides_split_the_grid_in_half() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1000) * 0.1, torch.tensor([-30.0, 20.0])])  # outliers far beyond both sides
    s, z = lsq_qparams(UINT4_AFFINE, x)
    assert z == 7  # 7 steps below 0, 8 above
    assert (UINT4_AFFINE.qmax - z) * s < 20.0 and (z - UINT4_AFFINE.qmin) * s < 30.0


def test_quantizer_initialised_by_it_keeps_positive_values() -> None:
    x = long_negative_tail()
    fq = mq.get_fake_quantizer("lsq")(UINT8_AFFINE, mq.get_observer("lsq")(UINT8_AFFINE))
    fq.enable_observation(True)
    fq(x)
    fq.enable_observation(False)
    fq.enable_quantization(True)
    y = fq.eval()(x)
    positives = x > 0
    assert (y[positives] > 0).float().mean() > 0.9  # the old range [lo, 0] sent all of them to 0
    scale = fq.export_qparams()[0].item()
    assert torch.all(y[positives] <= x.max() + scale)


def test_per_channel_zero_points() -> None:
    scheme = QuantScheme(4, signed=False, symmetric=False, per_channel=True)
    torch.manual_seed(0)
    rows = torch.stack([
        torch.rand(200),  # non-negative: z = qmin (the paper)
        torch.rand(200) * 2 - 0.5,  # a short negative part the grid holds: the minimum lands on qmin
        torch.cat([torch.rand(195), -torch.linspace(1.0, 30.0, 5)]),  # a long negative tail
        -torch.cat([torch.rand(195) * 0.1, torch.linspace(1.0, 30.0, 5)]),  # non-positive, overflowing: all below 0
    ])
    observer = mq.get_observer("lsq")(scheme)
    observer(rows)
    scale, z = observer.calculate_qparams()
    assert int(z[0]) == 0
    assert int(z[1]) == round(-rows[1].min().item() / scale[1].item())
    assert 0 < int(z[2]) < scheme.qmax
    assert abs((scheme.qmax - int(z[2])) * scale[2].item() - rows[2].max().item()) <= scale[2].item() / 2
    assert int(z[3]) == scheme.qmax
