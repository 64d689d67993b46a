"""mq-algos learnable quantizers: paper gradients (analytic and finite differences), observers, state dicts,
deploy equivalence, per-channel variants, APoT's refusal to export, and the presets."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from mq_algos.quantizers.apot import apot_levels
from mq_algos.quantizers.dorefa import DoReFaFakeQuantizer, bake_dorefa
from mq_algos.quantizers.dsq import soft_staircase
from mq_algos.quantizers.pact import PACTFakeQuantizer, pact_parameters
from torch import nn

import mq_core as mq
from mq_core import ExportError, QuantScheme, SchemeError
from mq_core.export.deploy import deploy_view
from mq_core.quant.functional import fake_quantize

INT4 = QuantScheme(4, signed=True, symmetric=True)  # [-8, 7]
UINT4_AFFINE = QuantScheme(4, signed=False, symmetric=False)  # [0, 15]
LEARNABLE = ("lsq", "lsq_plus", "pact", "dsq", "apot")


pytestmark = pytest.mark.usefixtures("deterministic")


def build(name: str, scheme: QuantScheme, scale: float | torch.Tensor = 1.0, zero_point: int | torch.Tensor = 0,
          **options: object) -> mq.FakeQuantizer:
    """A float64, calibrated, quantizing, training-mode quantizer initialised from (scale, zero_point)."""
    fq = mq.get_fake_quantizer(name)(scheme, mq.get_observer("minmax")(scheme), **options)
    fq.qname = f"test.{name}"
    fq.set_qparams(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point, dtype=torch.int32))
    fq.enable_quantization(True)
    return fq.double().train()


def set_param(fq: nn.Module, name: str, value: float) -> None:
    with torch.no_grad():
        getattr(fq, name).fill_(value)


def backprop(fq: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of sum(w * fq(x)) with respect to x and every parameter of ``fq``."""
    x = x.clone().requires_grad_(True)
    fq.zero_grad()
    (fq(x) * w).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in fq.named_parameters() if p.grad is not None})
    return grads


def central_difference(f: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """d f / d t elementwise for a scalar-valued f (float64)."""
    grad = torch.zeros_like(t)
    flat = grad.view(-1)
    for i in range(t.numel()):
        up, down = t.clone(), t.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        flat[i] = (f(up) - f(down)) / (2 * h)
    return grad


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-8) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=max(tol, 1e-6), atol=tol)


#: Central differences are O(h^2) accurate where the surrogate is smooth, O(h) across DSQ's integer points (where
#: its second derivative jumps); 1e-5 absolute still tells every gradient term apart.
FD = 1e-5


# --- LSQ --------------------------------------------------------------------------------------------------------------
def test_lsq_gradients_follow_the_paper_at_ties_and_out_of_range() -> None:
    s = 0.25
    fq = build("lsq", INT4, s)
    # v = x / s: inside, ties at k + 0.5 (half to even), exactly on a clip level, below and above the range
    v = torch.tensor([0.3, -2.7, 1.5, 2.5, -1.5, -0.5, 7.0, -8.0, -9.2, 7.4, 12.0], dtype=torch.float64)
    x, w = v * s, torch.linspace(0.5, 1.5, v.numel(), dtype=torch.float64)
    grads = backprop(fq, x, w)
    g = 1 / math.sqrt(v.numel() * 7)
    # inside round(v) - v (half to even at the ties), -8 at or below the range, 7 at or above it
    ds = torch.tensor([-0.3, -0.3, 0.5, -0.5, -0.5, 0.5, 7, -8, -8, 7, 7], dtype=torch.float64)
    close(grads["scale"], (w * ds).sum() * g)
    close(grads["x"], w * torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]))
    # forward at the ties is round half to even, as in every runtime
    assert fq(x)[2:6].tolist() == [2 * s, 2 * s, -2 * s, -0.0]


def lsq_surrogate(x: torch.Tensor, s: torch.Tensor, z: float, qmin: int, qmax: int,
                  residual: torch.Tensor) -> torch.Tensor:
    """LSQ's y = s * (clip(v) + [round(v) - v] held constant): its derivatives are the paper's gradients."""
    return s * (torch.clamp(x / s, qmin - z, qmax - z) + residual)


@pytest.mark.parametrize("scheme, zero_point", [(INT4, 0), (UINT4_AFFINE, 3)], ids=["signed", "affine-z3"])
def test_lsq_matches_finite_differences_of_its_surrogate(scheme: QuantScheme, zero_point: int) -> None:
    s = 0.25
    fq = build("lsq", scheme, s, zero_point)
    v = torch.tensor([0.3, -2.7, 1.5, 2.5, -1.2, -9.3, 14.6, 4.49], dtype=torch.float64)  # no clip kinks
    x, w = v * s, torch.randn(v.numel(), dtype=torch.float64)
    grads = backprop(fq, x, w)
    lo, hi = scheme.qmin - zero_point, scheme.qmax - zero_point
    inside = (v > lo) & (v < hi)
    residual = torch.where(inside, torch.round(v) - v, 0.0)
    g = 1 / math.sqrt(v.numel() * scheme.qmax)
    s_t = torch.tensor(s, dtype=torch.float64)
    fd_s = central_difference(lambda t: (w * lsq_surrogate(x, t, zero_point, scheme.qmin, scheme.qmax,
                                                            residual)).sum(), s_t)
    fd_x = central_difference(lambda t: (w * lsq_surrogate(t, s_t, zero_point, scheme.qmin, scheme.qmax,
                                                            residual)).sum(), x)
    close(grads["scale"], fd_s * g, FD)
    close(grads["x"], fd_x, FD)


def test_lsq_per_channel_scales_and_gradient_scale() -> None:
    scheme = QuantScheme(4, per_channel=True, ch_axis=1)
    scale = torch.tensor([0.25, 0.5, 1.0])
    fq = build("lsq", scheme, scale, torch.zeros(3, dtype=torch.int32))
    x = torch.randn(5, 3, 2, dtype=torch.float64) * 3
    w = torch.randn_like(x)
    grads = backprop(fq, x, w)
    s = scale.double().reshape(1, 3, 1)
    v = x / s
    ds = torch.where(v <= -8, -8.0, torch.where(v >= 7, 7.0, torch.round(v) - v))
    g = 1 / math.sqrt(10 * 7)  # N = elements per channel
    close(grads["scale"], (w * ds).sum(dim=(0, 2)) * g)
    close(fq(x), fake_quantize(x, scale.double(), torch.zeros(3, dtype=torch.int32), -8, 7, axis=1))


# --- LSQ+ -------------------------------------------------------------------------------------------------------------
def lsq_plus_surrogate(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return s * (torch.clamp((x - beta) / s, 0, 15) + residual) + beta


def test_lsq_plus_gradients_analytic_and_finite_differences() -> None:
    s, beta = 0.25, -0.3125  # beta = -1.25 s: off the integer grid
    fq = build("lsq_plus", UINT4_AFFINE, s, 1)
    set_param(fq, "offset", beta)
    v = torch.tensor([0.3, 2.5, 3.5, 7.2, 14.49, -0.6, -3.0, 15.7, 20.0], dtype=torch.float64)
    x, w = v * s + beta, torch.randn(v.numel(), dtype=torch.float64)
    grads = backprop(fq, x, w)
    g = 1 / math.sqrt(v.numel() * 15)
    below, above = v <= 0, v >= 15
    inside = ~(below | above)
    close(grads["scale"], (w * torch.where(below, 0.0, torch.where(above, 15.0, torch.round(v) - v))).sum() * g)
    close(grads["offset"], (w * ~inside).sum() * g)
    close(grads["x"], w * inside)
    residual = torch.where(inside, torch.round(v) - v, 0.0)
    s_t, b_t = torch.tensor(s, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)

    def loss(xs: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return (w * lsq_plus_surrogate(xs, scale, beta, residual)).sum()

    close(grads["scale"], g * central_difference(lambda t: loss(x, t, b_t), s_t), FD)
    close(grads["offset"], g * central_difference(lambda t: loss(x, s_t, t), b_t), FD)
    close(grads["x"], central_difference(lambda t: loss(t, s_t, b_t), x), FD)
    # ties at (x - beta) / s = k + 0.5 round half to even
    assert fq(x)[1:3].tolist() == [2 * s + beta, 4 * s + beta]


def test_lsq_plus_eval_snaps_the_offset_to_the_export_grid_and_keeps_gradients() -> None:
    s = 0.25
    fq = build("lsq_plus", UINT4_AFFINE, s, 1)
    set_param(fq, "offset", -0.3125)  # -beta / s = 1.25 -> z = 1
    scale, z = fq.export_qparams()
    assert int(z) == 1 and scale.item() == s
    x = torch.linspace(-1, 4, 41, dtype=torch.float64)
    fq.eval()
    y = fq(x)
    close(y, fake_quantize(x, scale.double(), z, 0, 15))
    assert not torch.allclose(y, fq.train()(x))  # training uses the float offset
    fq.eval()
    grads = backprop(fq, x, torch.ones_like(x))
    assert grads["scale"].abs() > 0 and grads["offset"].abs() > 0  # eval-mode reconstruction still learns


def test_lsq_plus_symmetric_grid_learns_no_offset() -> None:
    fq = build("lsq_plus", INT4, 0.1)
    assert [n for n, _ in fq.named_parameters()] == ["scale"]
    assert fq.offset.item() == 0.0 and int(fq.export_qparams()[1]) == 0


# --- PACT -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [QuantScheme(4, signed=False), INT4], ids=["unsigned", "signed"])
def test_pact_gradients(scheme: QuantScheme) -> None:
    alpha = 1.875 if not scheme.signed else 1.75  # s = alpha / qmax = 0.125 or 0.25: ties are exact
    fq = build("pact", scheme)
    set_param(fq, "alpha", alpha)
    s = alpha / scheme.qmax
    lower = alpha * scheme.qmin / scheme.qmax
    x = torch.tensor([0.3, 1.1, 2.5 * s, 3.5 * s, alpha, 2.4, 5.0, -0.7, -3.0], dtype=torch.float64)
    w = torch.randn(x.numel(), dtype=torch.float64)
    grads = backprop(fq, x, w)
    above, below = x >= alpha, x < lower
    ratio = scheme.qmin / scheme.qmax
    close(grads["alpha"], (w * above).sum() + ratio * (w * below).sum())
    close(grads["x"], w * ~(above | below))
    # finite differences of PACT's surrogate clip(x, lower, alpha), quantization straight-through (no kinks)
    smooth = x != alpha
    a_t = torch.tensor(alpha, dtype=torch.float64)

    def clip_sum(xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (w[smooth] * torch.clamp(xs, a * ratio, a)).sum()

    fd_alpha = central_difference(lambda t: clip_sum(x[smooth], t), a_t)
    close(backprop(fq, x[smooth], w[smooth])["alpha"], fd_alpha, FD)
    close(grads["x"][smooth], central_difference(lambda t: clip_sum(t, a_t), x[smooth]), FD)
    # forward: the runtime grid, ties half to even
    assert fq(x)[2:4].tolist() == [2 * s, 4 * s]
    close(fq(x), fake_quantize(x, torch.tensor(s, dtype=torch.float64), torch.tensor(0), scheme.qmin, scheme.qmax))


def test_pact_initialisation_and_weight_decay_parameters(caplog: pytest.LogCaptureFixture) -> None:
    scheme = QuantScheme(4, signed=False, symmetric=False)
    assert build("pact", scheme, 0.2, 0).alpha.item() == pytest.approx(3.0)  # top of the observed range
    assert build("pact", scheme, 0.2, 0, init_alpha=6.0).alpha.item() == 6.0
    with caplog.at_level("WARNING"):
        build("pact", scheme, 0.2, 5)
    assert "negative values" in caplog.text
    with pytest.raises(mq.ConfigError):
        build("pact", scheme, init_alpha=0.0)
    model = nn.Sequential(nn.ReLU(), build("pact", scheme, 0.2, 0))
    assert [name for name, _ in pact_parameters(model)] == ["1.alpha"]
    assert PACTFakeQuantizer.decay_parameter == "alpha"


# --- DSQ --------------------------------------------------------------------------------------------------------------
def test_dsq_staircase_is_the_papers_function() -> None:
    alpha = torch.tensor(0.3, dtype=torch.float64)
    lower, delta = -0.5, 0.25
    x = torch.linspace(lower + 1e-3, lower + 15 * delta - 1e-3, 101, dtype=torch.float64)
    t = (x - lower) / delta
    # Gong et al. eq. 3-5 in input units: k from alpha = 1 - tanh(0.5 k Delta), s = 1 / tanh(0.5 k Delta)
    k = 2 * torch.atanh(1 - alpha) / delta
    i = torch.floor(t)
    m = lower + (i + 0.5) * delta
    phi = torch.tanh(k * (x - m)) / torch.tanh(0.5 * k * delta)
    paper = i + (phi + 1) / 2
    close(soft_staircase(t, alpha), paper)
    # it interpolates the integers and is hard rounding in value
    assert torch.equal(torch.round(soft_staircase(t, alpha)), torch.round(t))


def test_dsq_gradients_analytic_and_finite_differences() -> None:
    lower, upper, alpha = -0.5, 3.25, 0.4  # Delta = 0.25 on [0, 15]
    fq = build("dsq", UINT4_AFFINE, learn_alpha=True)
    set_param(fq, "lower", lower)
    set_param(fq, "upper", upper)
    set_param(fq, "alpha", alpha)
    delta = (upper - lower) / 15
    t = torch.tensor([2.3, 3.5, 4.0, 7.8, 11.25, -2.0, 16.5], dtype=torch.float64)  # tie, integer, out of range
    x, w = lower + t * delta, torch.randn(t.numel(), dtype=torch.float64)
    grads = backprop(fq, x, w)
    inside = (t > 0) & (t < 15)
    k_s = 1 / (1 - alpha)
    k = math.log((k_s + 1) / (k_s - 1))
    frac = t - torch.floor(t)
    dphi = 0.5 * k_s * k * (1 - torch.tanh(k * (frac - 0.5)) ** 2)
    close(grads["x"], w * inside * dphi)
    assert dphi[1] == pytest.approx(0.5 * k_s * k)  # steepest at the tie

    a0 = torch.tensor(alpha, dtype=torch.float64)
    residual = torch.round(soft_staircase(torch.clamp(t, 0, 15), a0)) - soft_staircase(torch.clamp(t, 0, 15), a0)

    def surrogate(xs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        d = (hi - lo) / 15
        u = (torch.clamp(xs, lo, hi) - lo) / d
        return (w * (lo + d * (soft_staircase(u, a) + residual))).sum()

    lo_t, hi_t = torch.tensor(lower, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64)
    close(grads["x"], central_difference(lambda v: surrogate(v, lo_t, hi_t, a0), x), FD)
    close(grads["lower"], central_difference(lambda v: surrogate(x, v, hi_t, a0), lo_t), FD)
    close(grads["upper"], central_difference(lambda v: surrogate(x, lo_t, v, a0), hi_t), FD)
    close(grads["alpha"], central_difference(lambda v: surrogate(x, lo_t, hi_t, v), a0), FD)


def test_dsq_symmetric_grid_learns_only_the_upper_bound_and_exports_z0() -> None:
    fq = build("dsq", INT4, 0.25)
    assert [n for n, _ in fq.named_parameters()] == ["upper"]
    scale, z = fq.export_qparams()
    assert scale.item() == pytest.approx(0.25) and int(z) == 0
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    close(fq(x), fake_quantize(x, torch.tensor(0.25, dtype=torch.float64), torch.tensor(0), -8, 7))


# --- APoT -------------------------------------------------------------------------------------------------------------
def test_apot_levels_are_additive_powers_of_two() -> None:
    assert apot_levels(2).tolist() == [0.0, 0.25, 0.5, 1.0]  # {0, 2^-1, 2^-2, 2^-3} / 2^-1
    four = apot_levels(4)
    terms = [[0, 2**-1, 2**-3, 2**-5], [0, 2**-2, 2**-4, 2**-6]]  # the paper's b = 4, k = 2, n = 2
    expected = sorted({a + b for a in terms[0] for b in terms[1]})
    close(four.double(), torch.tensor(expected, dtype=torch.float64) / max(expected))
    assert [apot_levels(b).numel() for b in range(1, 7)] == [2, 4, 8, 16, 32, 64]


def test_apot_projection_gradients_and_refused_export() -> None:
    alpha = 1.5
    fq = build("apot", INT4)
    set_param(fq, "alpha", alpha)
    x = torch.tensor([0.1, -0.4, 0.9, 1.2, -1.45, 2.0, -3.0], dtype=torch.float64)
    w = torch.randn(x.numel(), dtype=torch.float64)
    levels = apot_levels(3).double()
    v = torch.clamp(x / alpha, -1, 1)
    nearest = levels[(v.abs()[:, None] - levels[None]).abs().argmin(dim=1)] * torch.sign(v)
    close(fq(x), nearest * alpha)
    residual = nearest - v
    grads = backprop(fq, x, w)
    a_t = torch.tensor(alpha, dtype=torch.float64)

    def surrogate(xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (w * a * (torch.clamp(xs / a, -1, 1) + residual)).sum()

    close(grads["alpha"], central_difference(lambda t: surrogate(x, t), a_t), FD)
    close(grads["x"], central_difference(lambda t: surrogate(t, a_t), x), FD)
    fq.eval()
    close(fq(x), nearest * alpha)  # eval runs the same simulation
    with pytest.raises(ExportError, match="APoT levels are non-uniform; no target in mq executes them"):
        fq.export_qparams()


def test_apot_weight_normalisation_per_channel() -> None:
    scheme = QuantScheme(4, per_channel=True)
    fq = build("apot", scheme, torch.full((3,), 0.5), torch.zeros(3, dtype=torch.int32), weight_norm=True)
    x = torch.randn(3, 20, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.1]], dtype=torch.float64) + 2
    assert fq.alpha.shape == (3,)
    set_param(fq, "alpha", 1.5)
    standardised = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, correction=0, keepdim=True) + 1e-5)
    v = torch.clamp(standardised / 1.5, -1, 1)
    levels = apot_levels(3).double()
    nearest = levels[(v.abs()[..., None] - levels).abs().argmin(dim=-1)] * torch.sign(v)
    close(fq(x), nearest * 1.5)


# --- DoReFa -----------------------------------------------------------------------------------------------------------
def test_dorefa_transform_grid_and_straight_through_gradient() -> None:
    fq = build("dorefa", INT4)
    w = torch.randn(4, 6, dtype=torch.float64)
    squashed = torch.tanh(w) / torch.tanh(w).abs().max()
    close(fq(w), torch.round(squashed * 7) / 7)
    assert fq.scale.item() == pytest.approx(1 / 7) and int(fq.zero_point) == 0
    up = torch.randn_like(w)
    grads = backprop(fq, w, up)

    def transform_sum(t: torch.Tensor) -> torch.Tensor:
        th = torch.tanh(t)
        return (up * th / th.abs().max()).sum()

    close(grads["x"], central_difference(transform_sum, w), FD)
    with pytest.raises(ExportError, match="not baked"):
        fq.export_qparams()
    with pytest.raises(SchemeError, match="signed grid"):
        DoReFaFakeQuantizer(QuantScheme(4, signed=False))


def test_dorefa_per_channel_normalises_each_channel() -> None:
    scheme = QuantScheme(4, per_channel=True)
    fq = build("dorefa", scheme, torch.ones(3), torch.zeros(3, dtype=torch.int32))
    w = torch.randn(3, 8, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [4.0]], dtype=torch.float64)
    th = torch.tanh(w)
    close(fq(w), torch.round(th / th.abs().amax(dim=1, keepdim=True) * 7) / 7)
    assert fq.scale.shape == (3,)


# --- shared behaviour -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_state_dict_round_trip_per_channel(name: str) -> None:
    scheme = QuantScheme(4, per_channel=True)
    observer = mq.get_observer("minmax")(scheme)
    fq = mq.get_fake_quantizer(name)(scheme, observer)
    weight = torch.randn(4, 3, 3, 3)
    fq.enable_observation(True)
    fq(weight)
    fq.enable_observation(False)
    fq.enable_quantization(True)
    params = dict(fq.named_parameters())
    assert params and all(p.shape == (4,) for p in params.values())
    with torch.no_grad():
        for p in params.values():
            p.mul_(1.1)
    fresh = mq.get_fake_quantizer(name)(scheme, mq.get_observer("minmax")(scheme))
    fresh.load_state_dict(fq.state_dict())
    assert all(isinstance(p, nn.Parameter) for p in fresh.parameters())
    for mode in (True, False):
        fq.train(mode)
        fresh.train(mode)
        assert torch.equal(fq(weight), fresh(weight))


@pytest.mark.parametrize("name", LEARNABLE)
def test_learned_scales_are_never_powers_of_two(name: str) -> None:
    with pytest.raises(SchemeError, match="power"):
        mq.get_fake_quantizer(name)(QuantScheme(8, pot_scale=True))


def test_lsq_observer_initialisation() -> None:
    scheme = QuantScheme(4, per_channel=True)
    observer = mq.get_observer("lsq")(scheme)
    x = torch.randn(3, 50)
    observer(x[:, :20])
    observer(x[:, 20:])  # batching does not change the statistics
    scale, z = observer.calculate_qparams()
    close(scale, 2 * x.abs().mean(dim=1) / math.sqrt(7))
    assert torch.equal(z, torch.zeros(3, dtype=torch.int32))
    affine = mq.get_observer("lsq")(UINT4_AFFINE)
    affine(torch.tensor([-1.0, 0.5, 2.0, 3.5]))
    s, z = affine.calculate_qparams()
    close(s, torch.tensor(2 * 1.75 / math.sqrt(15)))
    assert int(z) == round(1.0 / s.item())  # the observed minimum lands on qmin


def test_lsq_plus_observer_initialisation() -> None:
    observer = mq.get_observer("lsq_plus")(INT4)
    x = torch.randn(1000) * 0.2 + 0.05
    observer(x)
    scale, z = observer.calculate_qparams()
    mu, sigma = x.double().mean(), x.double().std(correction=0)
    amax = max(abs(mu - 3 * sigma), abs(mu + 3 * sigma))
    assert scale.item() == pytest.approx(float(amax) / 2 ** (4 - 1), rel=1e-5)  # paper: / 2^(b-1)
    assert int(z) == 0
    affine = mq.get_observer("lsq_plus")(UINT4_AFFINE)
    affine(x)
    for got, expected in zip(affine.calculate_qparams(), UINT4_AFFINE.qparams(x.min(), x.max())):
        assert torch.equal(got, expected)  # the paper's min/max initialisation for activations


# --- through prepare: calibration, QAT steps, deploy view ---------------------------------------------------------
def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


QAT_PRESETS = ("w4a4-lsq", "w2a4-lsq", "w4a4-lsq-plus", "w4a4-pact", "w4a4-dsq", "w4a4-dorefa-pact")


@pytest.mark.parametrize("preset", QAT_PRESETS)
def test_trained_model_deploys_exactly_as_it_evaluates(preset: str) -> None:
    x = torch.rand(16, 1, 8, 8)
    qmodel = mq.prepare(tiny_model().train(), "qdq", (x,), qconfig=preset, mode="qat")
    mq.calibrate(qmodel, [x], progress=False)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    target = torch.randint(0, 10, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(qmodel(x), target).backward()
        optimizer.step()
    qmodel.eval()
    if "dorefa" in preset:
        with torch.no_grad():
            before = qmodel(x)
        with pytest.raises(ExportError, match="bake_dorefa"):
            deploy_view(qmodel)
        assert bake_dorefa(qmodel) == 2
        with torch.no_grad():
            assert torch.equal(qmodel(x), before)  # baking changes nothing the model computes
    with torch.no_grad():
        assert torch.equal(deploy_view(qmodel)(x), qmodel(x))


def test_apot_models_simulate_but_refuse_to_deploy() -> None:
    x = torch.rand(4, 1, 8, 8)
    base = mq.get_backend("qdq").qconfig
    qconfig = mq.QConfig(base.weight.replace(fake_quantizer="apot"), base.activation, name="apot")
    qmodel = mq.prepare(tiny_model(), "qdq", (x,), qconfig=qconfig, mode="qat")
    mq.calibrate(qmodel, [x], progress=False)
    assert torch.isfinite(qmodel.eval()(x)).all()
    with pytest.raises(ExportError, match="non-uniform"):
        deploy_view(qmodel)


# --- presets ------------------------------------------------------------------------------------------------------
PTQ_PRESETS = {f"w{w}a4-{m}": m for w in (4, 2) for m in ("adaround", "brecq", "qdrop")}


def test_presets_resolve_on_qdq() -> None:
    qdq = mq.get_backend("qdq")
    lsq = mq.resolve_qconfig(qdq, "w4a4-lsq")
    assert (lsq.weight.fake_quantizer, lsq.activation.fake_quantizer) == ("lsq", "lsq")
    assert (lsq.weight.observer, lsq.activation.observer) == ("lsq", "lsq")
    assert (lsq.weight.scheme.bits, lsq.activation.scheme.bits) == (4, 4)
    assert lsq.weight.scheme.per_channel  # the backend keeps its granularity
    assert mq.resolve_qconfig(qdq, "w2a4-lsq").weight.scheme.bits == 2
    pact = mq.resolve_qconfig(qdq, "w4a4-pact")
    assert (pact.weight.fake_quantizer, pact.activation.fake_quantizer) == ("lsq", "pact")
    assert mq.resolve_qconfig(qdq, "w4a4-dorefa-pact").weight.fake_quantizer == "dorefa"
    for name, method in PTQ_PRESETS.items():
        preset = mq.get_qconfig(name)
        assert preset.recommended_method == method
        resolved = mq.resolve_qconfig(qdq, name)
        assert (resolved.weight.fake_quantizer, resolved.activation.fake_quantizer) == ("fixed", "fixed")
        assert (resolved.weight.observer, resolved.activation.observer) == ("mse", "mse")


@pytest.mark.parametrize("preset", [*QAT_PRESETS, *PTQ_PRESETS])
def test_tensorrt_refuses_sub_8_bit_presets(preset: str) -> None:
    with pytest.raises(SchemeError, match=r"cannot run W[24]A4"):
        mq.resolve_qconfig("tensorrt", preset)
