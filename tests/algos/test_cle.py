"""Cross-layer equalization (mq-algos ``cle``) and the composition of PTQ methods in ``mq.ptq``.

CLE must keep the float function (ReLU pairs exactly; ReLU6 pairs exactly on the data it measured), equalize the
per-channel weight ranges of each pair, and help where it is meant to: per-tensor weight grids on a network whose
channels have very different ranges. The composition rules (order, names, options) fail with MQErrors before any
work.
"""

from __future__ import annotations

import pytest
import torch
from mq_algos.ptq.cle import CLEConfig, equalize, find_pairs
from torch import nn

import mq_core as mq
from mq_core.errors import ConfigError, MQError
from mq_core.pipeline.ptq import ptq_plan
from mq_core.quant.switches import disable_all
from mq_core.testing.zoo import ZOO


class ReluChain(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, depthwise conv-BN-ReLU, 1x1 conv, pool, Linear: pairs of every kind CLE handles."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.c4 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.c4(x), 1), 1))


def imbalanced_chain(seed: int = 0) -> ReluChain:
    """A ReluChain whose channels span three orders of magnitude: channel i of c1 (and of c3) is scaled by a_i and
    the next layer's input channel i by 1 / a_i, which keeps the function (ReLU commutes with a_i > 0)."""
    torch.manual_seed(seed)
    model = ReluChain()
    with torch.no_grad():
        for bn in (model.b1, model.b2, model.b3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.1, 0.3)
        for bn, second in ((model.b1, model.c2), (model.b3, model.c4)):
            a = 10 ** torch.empty(16).uniform_(-1.5, 1.5)
            bn.weight.mul_(a)
            bn.bias.mul_(a)
            second.weight.div_(a.reshape(1, -1, 1, 1))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(24, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _float_outputs(qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    disable_all(qmodel)
    with torch.no_grad():
        return qmodel(x)


def test_cle_keeps_the_float_function_and_equalizes_ranges(images: torch.Tensor) -> None:
    model = imbalanced_chain()
    qmodel = mq.prepare(model, "qdq", example_inputs=(images[:1],))
    before = _float_outputs(qmodel, images)
    pairs = equalize(qmodel, CLEConfig(absorb_bias=False), [images])
    assert [(p.first_name, p.second_name) for p in pairs] == [("c1", "c2"), ("c2", "c3"), ("c3", "c4")]
    after = _float_outputs(qmodel, images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for pair in pairs:
        r1 = pair.first.weight.detach().abs().flatten(1).amax(1)
        w2 = pair.second.weight.detach().abs()
        r2 = (w2.transpose(0, 1) if pair.second.groups == 1 else w2).flatten(1).amax(1)
        torch.testing.assert_close(r1, r2, rtol=2e-3, atol=0)  # each channel: the same range on both sides


def test_bias_absorption_keeps_the_function_on_the_data(images: torch.Tensor) -> None:
    qmodel = mq.prepare(imbalanced_chain(), "qdq", example_inputs=(images[:1],))
    before = _float_outputs(qmodel, images)
    bias_before = qmodel.c3.bias.detach().clone()
    pairs = equalize(qmodel, CLEConfig(), [images])
    torch.testing.assert_close(_float_outputs(qmodel, images), before, rtol=1e-4, atol=1e-4)
    absorbed = {p.first_name for p in pairs if not p.padded}
    assert absorbed == {"c3"}  # c4 is the only second layer without padding
    assert not torch.allclose(qmodel.c3.bias, bias_before)


def test_relu6_pairs_are_bounded_by_the_clip() -> None:
    """TinyMobileNet (ReLU6 everywhere): a channel that reaches 6 keeps scale 1, the others are scaled, and the float
    function is unchanged on the data CLE measured."""
    model = ZOO["mobilenet"].build()
    x = ZOO["mobilenet"].inputs(16) * 3
    qmodel = mq.prepare(model, "qdq", example_inputs=(x[:1],))
    before = _float_outputs(qmodel, x)
    weights = {n: m.weight.detach().clone() for n, m in qmodel.named_modules() if hasattr(m, "weight_fake_quant")}
    pairs = equalize(qmodel, CLEConfig(absorb_bias=False), [x])
    assert any(isinstance(p.first.act, nn.ReLU6) for p in pairs)
    torch.testing.assert_close(_float_outputs(qmodel, x), before, rtol=1e-5, atol=1e-5)
    changed = [n for n, w in weights.items() if not torch.equal(w, qmodel.get_submodule(n).weight)]
    assert changed
    skipped = equalize(mq.prepare(model, "qdq", example_inputs=(x[:1],)), CLEConfig(relu6="skip"), [x])
    assert not any(isinstance(p.first.act, nn.ReLU6) for p in skipped)


def _logit_sqnr(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - quantized).pow(2).sum()))


def test_cle_rescues_per_tensor_weights(images: torch.Tensor) -> None:
    """The case CLE exists for: per-tensor 8-bit weights (the tvm backend) on imbalanced channels."""
    model = imbalanced_chain()
    with torch.no_grad():
        reference = model(images)
    results = {}
    for method in (None, "cle"):
        qmodel = mq.prepare(model, "tvm", example_inputs=(images[:1],))
        if method:
            mq.ptq(qmodel, method, images, progress=False)  # uncalibrated: cle calibrates after itself
        else:
            mq.calibrate(qmodel, images, progress=False)
        assert all(fq.is_calibrated for fq in mq.quantizers(qmodel).values())
        with torch.no_grad():
            results[method] = _logit_sqnr(reference, qmodel(images))
    assert results["cle"] > results[None] + 6, results


def test_cle_refuses_unfolded_batch_norm(images: torch.Tensor) -> None:
    qmodel = mq.prepare(imbalanced_chain(), "qdq", example_inputs=(images[:1],), mode="qat")
    with pytest.raises(ConfigError, match="BatchNorm"):
        mq.ptq(qmodel, "cle", images, progress=False)


def test_find_pairs_stops_at_branches() -> None:
    """A residual block's second conv feeds an add: it has no single consumer, so it starts no pair."""
    model = ZOO["resnet"].build()
    x = ZOO["resnet"].inputs(2)
    pairs = find_pairs(mq.prepare(model, "qdq", example_inputs=(x,)))
    names = {(p.first_name, p.second_name) for p in pairs}
    assert ("layer1.0.conv1", "layer1.0.conv2") in names
    assert not any(first.endswith("conv2") for first, _ in names)


@pytest.mark.parametrize(
    ("method", "options", "error"),
    [
        ("adaround,cle", {}, "must come before"),
        ("cle,cle", {}, "twice"),
        ("cle,,adaround", {}, "empty name"),
        ("cle,bias_correction", {"iterations": 5}, "iterations"),  # cle has iterations, so it goes there: valid
        ("cle,bias_correction", {"nonsense": 1}, "no PTQ method of cle,bias_correction has an option 'nonsense'"),
        ("cle,bias_correction", {"adaround.iterations": 5}, "not among"),
        ("cle,bias_correction", {"mode": "sideways"}, "mode"),
    ],
)
def test_composition_errors_are_clear(method: str, options: dict, error: str) -> None:
    if options == {"iterations": 5}:
        plan = ptq_plan(method, **options)
        assert [(m.name, getattr(c, "iterations", None)) for m, c in plan] == [("cle", 5), ("bias_correction", None)]
        return
    with pytest.raises(MQError, match=error):
        ptq_plan(method, **options)


def test_composition_routes_options_and_refuses_config_objects() -> None:
    plan = ptq_plan("cle,bias_correction,adaround", **{"adaround.iterations": 7, "mode": "analytic"})
    assert [m.name for m, _ in plan] == ["cle", "bias_correction", "adaround"]
    assert plan[1][1].mode == "analytic" and plan[2][1].iterations == 7
    with pytest.raises(ConfigError, match="configures one method"):
        ptq_plan("cle,adaround", config=plan[0][1])
    with pytest.raises(MQError, match="unknown"):
        ptq_plan("cle,nosuchmethod")


def test_calibrated_methods_still_need_calibration(images: torch.Tensor) -> None:
    qmodel = mq.prepare(imbalanced_chain(), "qdq", example_inputs=(images[:1],))
    with pytest.raises(MQError, match=r"Run mq\.calibrate"):
        mq.ptq(qmodel, "bias_correction", images, progress=False)


def test_composed_methods_run_in_order(images: torch.Tensor) -> None:
    """cle then bias_correction through one mq.ptq call on a calibrated model: CLE's rescaling forces a fresh
    calibration before bias correction reads the qparams, and the result beats the defaults on per-tensor weights."""
    model = imbalanced_chain()
    with torch.no_grad():
        reference = model(images)
    qmodel = mq.prepare(model, "tvm", example_inputs=(images[:1],))
    mq.calibrate(qmodel, images, progress=False)
    with torch.no_grad():
        default = _logit_sqnr(reference, qmodel(images))
    scale_before = qmodel.get_submodule("c1").weight_fake_quant.scale.clone()
    mq.ptq(qmodel, "cle,bias_correction", images, progress=False)
    assert not torch.equal(qmodel.get_submodule("c1").weight_fake_quant.scale, scale_before)  # recalibrated
    with torch.no_grad():
        assert _logit_sqnr(reference, qmodel(images)) > default + 6


def test_cli_refuses_a_bad_composition_before_any_work() -> None:
    from click.testing import CliRunner

    from mq_core.cli.main import cli

    result = CliRunner().invoke(cli, ["quantize", "--method", "adaround,cle"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "cle rewrites the float weights, so it must come before" in result.output
