"""The ``kl`` observer (TensorRT's entropy calibration) on the distributions that decide whether it helps: a heavy tail
it must clip, post-ReLU6 tensors with point masses (dead channels' constants, saturation) it must not clip, and a
range that grows across batches, whose merged histogram must be the histogram of all the data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mq_core.quant.functional import fake_quantize
from mq_core.quant.observers.kl import KLObserver, atom_histogram, magnitude_histogram
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.scheme import INT8_SYM, UINT8_AFFINE


def _sqnr(x: torch.Tensor, obs: KLObserver | MinMaxObserver, on: torch.Tensor | None = None) -> float:
    """SQNR (dB) of ``x`` on ``obs``'s grid, measured on the values ``on`` selects (all by default)."""
    scale, zero_point = obs.calculate_qparams()
    q = fake_quantize(x, scale, zero_point, obs.scheme.qmin, obs.scheme.qmax, None, True)
    keep = torch.ones_like(x, dtype=torch.bool) if on is None else on
    return float(10 * torch.log10(x[keep].pow(2).sum() / (x - q)[keep].pow(2).sum()))


def _observe(obs: KLObserver | MinMaxObserver, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        obs(batch)


def test_heavy_tail_is_clipped_and_the_bulk_gains() -> None:
    """Student-t (3 degrees of freedom): a few values reach 20x the typical magnitude; min/max spends its levels
    on them. kl must clip below the max and quantize the bulk (|x| < 5) better, both for a signed symmetric grid
    and for the uint8 affine grid of a real backend."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 4096, generator=g) / torch.randn(3, 4, 4096, generator=g).pow(2).mean(0).sqrt()
               for _ in range(3)]  # N(0, 1) / sqrt(chi2_3 / 3): Student-t, 3 degrees of freedom
    x = torch.cat([b.flatten() for b in batches])
    bulk = x.abs() < 5
    for scheme in (INT8_SYM, UINT8_AFFINE):
        kl, minmax = KLObserver(scheme), MinMaxObserver(scheme)
        _observe(kl, batches)
        _observe(minmax, batches)
        hi = kl.compute_range()[1]
        assert float(hi) < 0.5 * float(x.abs().max())
        assert float(hi) > 5  # keeps the bulk
        assert _sqnr(x, kl, bulk) > _sqnr(x, minmax, bulk) + 3


def _relu6_with_atoms(seed: int) -> torch.Tensor:
    """A late depthwise output of a ReLU6 network: live channels ReLU6(1.5 N(0, 1)) (half exact zeros, a few
    saturated at 6) and a quarter of dead channels, each the constant ReLU6(bias)."""
    g = torch.Generator().manual_seed(seed)
    x = F.relu6(torch.randn(8, 64, 8, 8, generator=g) * 1.5 + 0.5)
    x[:, :16] = F.relu6(torch.rand(16, generator=g) * 3)[None, :, None, None]
    return x


def test_point_masses_do_not_make_kl_clip_relu6_outputs() -> None:
    # Each dead channel's constant is one histogram bin holding 512 counts per batch. The search used to count them
    # as density that wide levels smear, and clipped this tensor to about half its range (22 dB against 47 dB of
    # min/max); on EfficientNet-Lite0 the same clipped the last depthwise outputs from 6 to 4 (docs/algorithms.md).
    batches = [_relu6_with_atoms(seed) for seed in range(4)]
    kl, minmax = KLObserver(UINT8_AFFINE), MinMaxObserver(UINT8_AFFINE)
    _observe(kl, batches)
    _observe(minmax, batches)
    x = torch.cat([b.flatten() for b in batches])
    lo, hi = kl.compute_range()
    assert float(lo) == 0 and float(hi) > 0.9 * 6
    assert _sqnr(x, kl) > _sqnr(x, minmax) - 0.5


def test_atoms_are_the_values_repeated_exactly() -> None:
    x = torch.cat([torch.zeros(20), torch.full((16,), -1.5), torch.full((15,), 0.7), torch.linspace(0.1, 2.0, 50)])
    atoms = atom_histogram(x, torch.tensor(2.0), 8)
    assert atoms.tolist() == [20.0, 0, 0, 0, 0, 0, 16.0, 0]  # 0.7 (15 times) is not, |-1.5| lands in bin 6
    obs = KLObserver(UINT8_AFFINE, bins=256)
    obs(x)
    assert float(obs.atoms.sum()) == 36 and torch.all(obs.atoms <= obs.histogram)


def test_merging_batches_equals_one_histogram_of_their_union() -> None:
    """Batch by batch, the range grows (each batch wider than the last, one narrower) and the accumulated histogram
    is re-binned each time; the result must be the histogram of all the data, within one bin of the final grid,
    and so must the threshold."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4096, generator=g) * s for s in (0.5, 1.0, 0.7, 2.0, 3.0)]
    merged, union = KLObserver(INT8_SYM), KLObserver(INT8_SYM)
    _observe(merged, batches)
    union(torch.cat(batches))
    assert torch.equal(merged.max_val, union.max_val) and torch.equal(merged.min_val, union.min_val)
    assert float(merged.histogram.sum()) == pytest.approx(float(union.histogram.sum()), rel=1e-12)
    # cumulative counts at every bin edge agree within the mass of one bin of the union's histogram
    gap = (merged.histogram.cumsum(0) - union.histogram.cumsum(0)).abs().max()
    assert float(gap) <= float(union.histogram.max())
    limit = float(union.max_val.abs().maximum(union.min_val.abs()))
    assert abs(float(merged.compute_range()[1] - union.compute_range()[1])) <= 4 * limit / 2048
    # a batch inside the current range adds exactly its own histogram, no re-binning
    before = merged.histogram.clone()
    inside = torch.randn(1000, generator=g)
    merged(inside)
    assert torch.equal(merged.histogram - before, magnitude_histogram(inside.abs(), torch.tensor(limit), 2048))


def test_state_dict_round_trips_and_older_checkpoints_without_atoms_load() -> None:
    calibrated = KLObserver(UINT8_AFFINE)
    _observe(calibrated, [_relu6_with_atoms(0)])
    state = calibrated.state_dict()
    fresh = KLObserver(UINT8_AFFINE)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.compute_range()[1], calibrated.compute_range()[1])
    older = KLObserver(UINT8_AFFINE)
    older.load_state_dict({k: v for k, v in state.items() if k != "atoms"})
    assert torch.equal(older.atoms, torch.zeros_like(state["histogram"]))
