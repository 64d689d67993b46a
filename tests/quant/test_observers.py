"""Observers: range shapes and values, batch combination, state_dict round trips, degenerate data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mq_core.errors import ConfigError, SchemeError
from mq_core.quant.functional import fake_quantize
from mq_core.quant.observers import (
    ClipStdObserver,
    EMAMinMaxObserver,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
)
from mq_core.quant.observers.kl import kl_divergences, magnitude_histogram, rebin
from mq_core.quant.scheme import INT8_SYM, UINT8_AFFINE, UINT8_SYM, QuantScheme

OBSERVERS: dict[str, tuple[type[Observer], dict[str, Any]]] = {
    "minmax": (MinMaxObserver, {}),
    "ema_minmax": (EMAMinMaxObserver, {}),
    "percentile": (PercentileObserver, {"percentile": 99.9}),
    "mse": (MSEObserver, {"num_candidates": 40}),
    "kl": (KLObserver, {"bins": 512}),  # the default 2048 is exercised by the KL tests below
    "clip_std": (ClipStdObserver, {}),
}
PER_CHANNEL = [name for name, (cls, _) in OBSERVERS.items() if cls.per_channel_supported]
SHAPE = (6, 5, 4, 3)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(name: str, scheme: QuantScheme = INT8_SYM) -> Observer:
    cls, options = OBSERVERS[name]
    return cls(scheme, **options)


def per_channel(axis: int, bits: int = 8, **changes: Any) -> QuantScheme:
    return QuantScheme(bits, per_channel=True, ch_axis=axis, **changes)


def supported(schemes: dict[str, QuantScheme]) -> list[Any]:
    """Every (observer, scheme) pair the observer accepts, as pytest params with readable ids."""
    return [
        pytest.param(name, scheme, id=f"{name}-{label}")
        for name, (cls, _) in OBSERVERS.items()
        for label, scheme in schemes.items()
        if cls.per_channel_supported or not scheme.per_channel
    ]


def lp_error(x: torch.Tensor, scheme: QuantScheme, lo: torch.Tensor, hi: torch.Tensor, p: float = 2.0) -> float:
    scale, zero_point = scheme.qparams(lo, hi)
    axis = scheme.ch_axis if scheme.per_channel else None
    xq = fake_quantize(x, scale, zero_point, scheme.qmin, scheme.qmax, axis, exact=True)
    return float((xq - x).abs().pow(p).mean())


def channel_rows(x: torch.Tensor, axis: int) -> np.ndarray:
    return np.moveaxis(x.numpy(), axis, 0).reshape(x.shape[axis], -1)


# --- every observer ---------------------------------------------------------------------------------------------


def test_package_exports_every_observer() -> None:
    import mq_core.quant.observers as observers

    assert {cls.__name__ for cls, _ in OBSERVERS.values()} <= set(observers.__all__)


@pytest.mark.parametrize("name", OBSERVERS)
def test_per_tensor_range_is_a_scalar_pair(name: str) -> None:
    obs = make(name)
    obs(randn(*SHAPE))
    lo, hi = obs.compute_range()
    assert lo.shape == hi.shape == ()
    assert lo.dtype == hi.dtype == torch.float32
    assert float(lo) < 0 < float(hi)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_range_has_one_entry_per_channel(name: str, axis: int) -> None:
    obs = make(name, per_channel(axis))
    obs(randn(*SHAPE))
    lo, hi = obs.compute_range()
    assert lo.shape == hi.shape == (SHAPE[axis],)
    assert (lo < 0).all() and (hi > 0).all()


@pytest.mark.parametrize(
    ("name", "scheme"), supported({"sym": INT8_SYM, "affine": UINT8_AFFINE, "axis0": per_channel(0),
                                   "axis1": per_channel(1)})
)
def test_state_dict_round_trip_into_a_fresh_observer(name: str, scheme: QuantScheme) -> None:
    obs = make(name, scheme)
    for seed in range(3):
        obs(randn(*SHAPE, seed=seed) * (seed + 1))
    fresh = make(name, scheme)
    fresh.load_state_dict(obs.state_dict())
    for got, want in zip(fresh.compute_range(), obs.compute_range()):
        assert torch.equal(got, want)
    assert fresh.observed


@pytest.mark.parametrize(
    ("name", "scheme"), supported({"sym": INT8_SYM, "affine": UINT8_AFFINE, "unsigned": UINT8_SYM,
                                   "axis1": per_channel(1)})
)
def test_all_zero_tensor_gives_a_finite_positive_scale(name: str, scheme: QuantScheme) -> None:
    obs = make(name, scheme)
    obs(torch.zeros(SHAPE))
    scale, zero_point = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (zero_point >= scheme.qmin).all() and (zero_point <= scheme.qmax).all()


# --- min/max ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
def test_minmax_per_channel_matches_numpy(axis: int) -> None:
    first, second = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2) * 3
    obs = MinMaxObserver(per_channel(axis))
    obs(first)
    obs(second)
    rows = channel_rows(torch.cat([first, second], dim=1 - axis), axis)
    lo, hi = obs.compute_range()
    np.testing.assert_array_equal(lo.numpy(), rows.min(axis=1))
    np.testing.assert_array_equal(hi.numpy(), rows.max(axis=1))


def test_ema_minmax_averages_batches() -> None:
    obs = EMAMinMaxObserver(INT8_SYM, averaging_constant=0.25)
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-5.0, 6.0]))
    lo, hi = obs.compute_range()
    assert float(lo) == pytest.approx(0.75 * -1 + 0.25 * -5)
    assert float(hi) == pytest.approx(0.75 * 2 + 0.25 * 6)


# --- percentile -------------------------------------------------------------------------------------------------


def test_percentile_of_magnitude_is_within_two_percent_of_numpy() -> None:
    x = randn(100_000, seed=3)
    obs = PercentileObserver(INT8_SYM, percentile=99.9)
    obs(x)
    lo, hi = obs.compute_range()
    want = np.percentile(x.abs().numpy(), 99.9)
    assert float(hi) == pytest.approx(want, rel=0.02)
    assert float(lo) == -float(hi)


def test_percentile_unsigned_symmetric_starts_at_zero() -> None:
    obs = PercentileObserver(UINT8_SYM, percentile=99.0)
    obs(randn(10_000, seed=4).relu())
    lo, hi = obs.compute_range()
    assert float(lo) == 0 and float(hi) > 0


def test_percentile_affine_clips_both_tails() -> None:
    x = randn(100_000, seed=5) * 2 + 1
    obs = PercentileObserver(UINT8_AFFINE, percentile=99.5)
    obs(x)
    want_lo, want_hi = np.percentile(x.numpy(), [0.5, 99.5])
    lo, hi = obs.compute_range()
    assert float(lo) == pytest.approx(want_lo, rel=0.02)
    assert float(hi) == pytest.approx(want_hi, rel=0.02)


@pytest.mark.parametrize("axis", [0, 1])
def test_percentile_per_channel_matches_numpy_per_row(axis: int) -> None:
    x = randn(16, 8, 32, 32, seed=6) * torch.linspace(0.5, 4, 8)[None, :, None, None]
    obs = PercentileObserver(per_channel(axis), percentile=99.0)
    obs(x)
    want = np.percentile(np.abs(channel_rows(x, axis)), 99.0, axis=1)
    np.testing.assert_allclose(obs.compute_range()[1].numpy(), want, rtol=0.02)


def test_percentile_averages_batches_like_ema() -> None:
    batches = [randn(50_000, seed=s) * (s + 1) for s in range(3)]
    obs = PercentileObserver(INT8_SYM, percentile=99.0, averaging_constant=0.2)
    expected = None
    for batch in batches:
        obs(batch)
        single = PercentileObserver(INT8_SYM, percentile=99.0)
        single(batch)
        current = single.compute_range()[1]
        expected = current if expected is None else 0.8 * expected + 0.2 * current
    assert torch.allclose(obs.compute_range()[1], expected)


# --- MSE --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(4), QuantScheme(4, signed=False, symmetric=False), per_channel(0, bits=4), per_channel(1, bits=3)],
    ids=["int4-sym", "uint4-affine", "int4-axis0", "int3-axis1"],
)
def test_mse_is_never_worse_than_minmax(scheme: QuantScheme) -> None:
    x = randn(*SHAPE, seed=7) ** 3
    mse, minmax = MSEObserver(scheme), MinMaxObserver(scheme)
    mse(x)
    minmax(x)
    assert lp_error(x, scheme, *mse.compute_range()) <= lp_error(x, scheme, *minmax.compute_range())


def test_mse_clips_outliers() -> None:
    x = randn(10_000, seed=8)
    x[:3] = torch.tensor([40.0, -35.0, 30.0])
    obs = MSEObserver(QuantScheme(4))
    obs(x)
    lo, hi = obs.compute_range()
    assert float(hi) < 0.5 * 40 and float(lo) > -0.5 * 40
    minmax = MinMaxObserver(QuantScheme(4))
    minmax(x)
    assert lp_error(x, QuantScheme(4), lo, hi) < 0.5 * lp_error(x, QuantScheme(4), *minmax.compute_range())


def test_mse_chooses_the_best_candidate_in_the_lp_norm() -> None:
    scheme, p = QuantScheme(4, signed=False, symmetric=False), 2.4
    x = randn(4_000, seed=9).exp()
    obs = MSEObserver(scheme, p=p)
    obs(x)
    lo0, hi0 = x.min(), x.max()
    candidates = [lp_error(x, scheme, lo0 * (1 - 0.01 * i), hi0 * (1 - 0.01 * i), p) for i in range(100)]
    assert lp_error(x, scheme, *obs.compute_range(), p) == pytest.approx(min(candidates), rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_mse_per_channel_searches_each_channel_independently(axis: int) -> None:
    x = randn(*SHAPE, seed=10) * torch.linspace(0.1, 5, SHAPE[1])[None, :, None, None]
    obs = MSEObserver(per_channel(axis, bits=4))
    obs(x)
    lo, hi = obs.compute_range()
    for c, row in enumerate(x.movedim(axis, 0)):
        single = MSEObserver(QuantScheme(4))
        single(row)
        assert torch.allclose(torch.stack([lo[c], hi[c]]), torch.stack(single.compute_range()))


def test_mse_takes_the_running_mean_across_batches() -> None:
    batches = [randn(2_000, seed=s) * (s + 1) for s in range(3)]
    obs = MSEObserver(QuantScheme(4, symmetric=False))
    ranges = []
    for batch in batches:
        obs(batch)
        single = MSEObserver(QuantScheme(4, symmetric=False))
        single(batch)
        ranges.append(torch.stack(single.compute_range()))
    assert torch.allclose(torch.stack(obs.compute_range()), torch.stack(ranges).mean(dim=0))


@pytest.mark.parametrize("options", [{"p": 0}, {"num_candidates": 0}, {"num_candidates": 101}])
def test_mse_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        MSEObserver(INT8_SYM, **options)


# --- KL ---------------------------------------------------------------------------------------------------------


def _outlier_data() -> torch.Tensor:
    x = randn(100_000, seed=11)
    x[:4] = torch.tensor([60.0, -55.0, 50.0, 58.0])
    return x


def test_kl_clips_outliers_where_minmax_does_not() -> None:
    x = _outlier_data()
    kl, minmax = KLObserver(INT8_SYM), MinMaxObserver(INT8_SYM)
    kl(x)
    minmax(x)
    max_abs = float(x.abs().max())
    lo, hi = kl.compute_range()
    assert float(hi) < 0.5 * max_abs and float(lo) == -float(hi)
    assert float(hi) > 2.5  # still keeps the Gaussian bulk
    assert float(minmax.compute_range()[1]) == max_abs


def test_kl_unsigned_and_affine_ranges() -> None:
    x = _outlier_data()
    unsigned = KLObserver(UINT8_SYM)
    unsigned(x.abs())
    lo, hi = unsigned.compute_range()
    assert float(lo) == 0 and 0 < float(hi) < 30
    affine = KLObserver(UINT8_AFFINE)
    affine(x.clamp(min=-2))
    lo, hi = affine.compute_range()
    assert float(lo) == -2 and 0 < float(hi) < 30


def test_kl_per_channel_is_refused() -> None:
    with pytest.raises(SchemeError):
        KLObserver(per_channel(0))


def test_kl_needs_enough_bins() -> None:
    with pytest.raises(ConfigError):
        KLObserver(INT8_SYM, bins=200)


def test_kl_histogram_rebins_to_a_wider_batch_keeping_every_count() -> None:
    obs = KLObserver(INT8_SYM)
    first, second = randn(3, 1000, seed=12), randn(2, 700, seed=13) * 10
    obs(first)
    obs(second)
    assert obs.histogram.shape == (2048,)
    assert float(obs.histogram.sum()) == pytest.approx(first.numel() + second.numel(), rel=1e-12)
    assert float(obs.max_val) == float(torch.cat([first.flatten(), second.flatten()]).abs().max())
    # a batch inside the current range adds exactly its own histogram
    before = obs.histogram.clone()
    third = randn(500, seed=14)
    obs(third)
    limit = torch.maximum(-obs.min_val, obs.max_val)
    assert torch.equal(obs.histogram - before, magnitude_histogram(third.abs(), limit, 2048))


def test_kl_histogram_of_zeros_moves_to_bin_zero_when_the_range_opens() -> None:
    obs = KLObserver(INT8_SYM)
    obs(torch.zeros(100))
    obs(torch.full((10,), 3.0))
    assert obs.histogram[0] == 100 and obs.histogram[-1] == 10 and obs.histogram.sum() == 110


@pytest.mark.parametrize(
    ("scheme", "data", "levels"),
    [(INT8_SYM, -1.0, 128), (UINT8_SYM, 1.0, 256), (UINT8_AFFINE, -1.0, 128), (UINT8_AFFINE, 1.0, 256)],
)
def test_kl_levels_follow_the_grid_half_that_covers_magnitudes(
    scheme: QuantScheme, data: float, levels: int
) -> None:
    obs = KLObserver(scheme)
    obs(torch.tensor([data, 2.0]))
    assert obs.quant_levels() == levels


def test_rebin_matches_a_direct_histogram_for_aligned_edges() -> None:
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(15))
    hist = magnitude_histogram(values, torch.tensor(1.0), 64)
    wide = rebin(hist, torch.tensor(1.0), torch.tensor(2.0))
    assert torch.equal(wide, magnitude_histogram(values, torch.tensor(2.0), 64))


def _reference_kl(hist: np.ndarray, levels: int) -> np.ndarray:
    """Plain per-threshold loop: group j holds bins ceil(j i / levels) .. ceil((j + 1) i / levels) - 1."""

    def smooth(d: np.ndarray) -> np.ndarray:
        zero, nonzero = d == 0, d != 0
        taken = 1e-4 * zero.sum() / nonzero.sum()
        return d + 1e-4 * zero - taken * nonzero

    out = []
    for i in range(levels, hist.size + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for j in range(levels):
            start, stop = -(-j * i // levels), -(-(j + 1) * i // levels)
            nonzero = p[start:stop] != 0
            if nonzero.any():
                q[start:stop] = np.where(nonzero, hist[start:stop].sum() / nonzero.sum(), 0)
        p, q = smooth(p), smooth(q)
        p, q = p / p.sum(), q / q.sum()
        out.append(np.sum(p * np.log(p / q)))
    return np.array(out)


def test_kl_divergences_match_a_per_threshold_loop() -> None:
    rng = np.random.default_rng(16)
    hist = np.histogram(np.abs(rng.standard_normal(20_000)), bins=300, range=(0, 6))[0].astype(np.float64)
    hist[250] += 3  # outliers
    got = kl_divergences(torch.from_numpy(hist), 64).numpy()
    np.testing.assert_allclose(got, _reference_kl(hist, 64), rtol=1e-9, atol=1e-12)



def test_kl_groups_follow_the_real_grid_not_a_remainder_bin() -> None:
    # 10 bins onto 4 levels: groups of 3, 2, 3, 2 bins (ceil(k * 10 / 4)), not 2, 2, 2, 4
    hist = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    got = kl_divergences(torch.from_numpy(hist), 4).numpy()
    np.testing.assert_allclose(got, _reference_kl(hist, 4), rtol=1e-9, atol=1e-12)
    assert got[-1] > 0  # no threshold quantizes for free


def _post_relu_batches() -> list[torch.Tensor]:
    """ReLU outputs (half exact zeros) whose range grows from batch to batch, as in a real network's activations."""
    g = torch.Generator().manual_seed(20)
    return [torch.relu(torch.randn(4, 16, 32, 32, generator=g)) * (1 + b) for b in range(4)]


def _sqnr(x: torch.Tensor, obs: Observer) -> float:
    scale, zero_point = obs.calculate_qparams()
    q = fake_quantize(x, scale, zero_point, obs.scheme.qmin, obs.scheme.qmax, None, True)
    return float(10 * torch.log10(x.pow(2).sum() / (x - q).pow(2).sum()))


def test_kl_on_post_relu_data_keeps_the_range_instead_of_clipping_to_the_first_threshold() -> None:
    # The zeros' spike in bin 0 used to win every divergence at the smallest threshold (one bin per level): the
    # range became 1/8 of the data's (10 dB here) and MobileNet-like networks lost all top-1 agreement.
    batches = _post_relu_batches()
    kl, minmax = KLObserver(UINT8_AFFINE), MinMaxObserver(UINT8_AFFINE)
    for batch in batches:
        kl(batch)
        minmax(batch)
    x = torch.cat([b.flatten() for b in batches])
    lo, hi = kl.compute_range()
    assert float(lo) == 0 and float(hi) > 0.5 * float(x.max())
    # level with min/max on a tail-free tensor (above it or below by a fraction of a dB, by seed), not 30 dB under
    assert _sqnr(x, kl) > _sqnr(x, minmax) - 1.0 > 40


# --- ClipStd ----------------------------------------------------------------------------------------------------


def test_clip_std_widens_to_k_sigma() -> None:
    obs = ClipStdObserver(INT8_SYM, k=2.6)
    obs(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))  # mean 2, population std 4
    lo, hi = obs.compute_range()
    assert float(lo) == pytest.approx(2 - 2.6 * 4)
    assert float(hi) == pytest.approx(2 + 2.6 * 4)


def test_clip_std_never_narrower_than_minmax() -> None:
    x = randn(10_000, seed=17)
    x[0] = 50.0
    obs = ClipStdObserver(INT8_SYM)
    obs(x)
    mean, std = x.double().mean(), x.double().std(unbiased=False)
    lo, hi = obs.compute_range()
    assert float(hi) == 50.0
    assert float(lo) == pytest.approx(min(float(mean - 2.6 * std), float(x.min())), rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_clip_std_per_channel_combines_batches_exactly(axis: int) -> None:
    first, second = randn(*SHAPE, seed=18), randn(*SHAPE, seed=19) * 2 + 1
    obs = ClipStdObserver(per_channel(axis), k=3.0)
    obs(first)
    obs(second)
    rows = channel_rows(torch.cat([first, second], dim=1 - axis), axis).astype(np.float64)
    mean, std = rows.mean(axis=1), rows.std(axis=1)
    want_lo = np.minimum(mean - 3 * std, rows.min(axis=1))
    want_hi = np.maximum(mean + 3 * std, rows.max(axis=1))
    lo, hi = obs.compute_range()
    np.testing.assert_allclose(lo.numpy(), want_lo, rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), want_hi, rtol=1e-6)
    assert int(obs.count) == rows.shape[1]
