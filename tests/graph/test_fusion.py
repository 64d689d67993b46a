"""Fusion through prepare(): every registered pattern, BN folded exactly in PTQ mode and simulated in QAT mode."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mq_core as mq
from mq_core.nn import QAT_MODULES, QATBnModule, QATModule
from mq_core.plugins.lookup import fusion_patterns
from mq_core.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("deterministic")


def randomized(bn: nn.Module) -> nn.Module:
    c = bn.running_mean.numel()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c) * 0.5)
        bn.running_var.copy_(torch.rand(c) + 0.5)
        bn.weight.copy_(torch.rand(c) + 0.5)
        bn.bias.copy_(torch.randn(c) * 0.3)
    return bn


#: layer factory, BatchNorm factory, input shape
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d, (4, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d, (4, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3), nn.BatchNorm3d, (4, 3, 5, 5, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), nn.BatchNorm1d, (4, 3, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 2, stride=2, bias=False), nn.BatchNorm2d, (4, 3, 5, 5)),
    "linear": (lambda: nn.Linear(5, 4), nn.BatchNorm1d, (8, 5)),
    "conv2d_frozen_bn": (lambda: nn.Conv2d(3, 4, 3), mq.FrozenBatchNorm2d, (4, 3, 8, 8)),
    "conv_transpose2d_frozen_bn": (lambda: nn.ConvTranspose2d(3, 4, 3), mq.FrozenBatchNorm2d, (4, 3, 5, 5)),
}
ACTS: dict[str, Callable[[], nn.Module] | None] = {"none": None, "relu": nn.ReLU, "relu6": nn.ReLU6}


def chain(layer: str, act: str | None, bn: bool = True) -> tuple[nn.Module, torch.Tensor]:
    make_layer, make_bn, shape = LAYERS[layer]
    parts = [make_layer()]
    if bn:
        parts.append(randomized(make_bn(4)))
    if act is not None and ACTS[act] is not None:
        parts.append(ACTS[act]())
    return nn.Sequential(*parts).eval(), torch.randn(shape)


CASES = [(layer, act) for layer in LAYERS for act in ACTS]


def _only_layer(q: nn.Module) -> nn.Module:
    layers = [m for m in q.modules() if isinstance(m, QATModule)]
    assert len(layers) == 1
    return layers[0]


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, mq.FrozenBatchNorm2d))]


def test_every_standard_pattern_is_registered() -> None:
    names = {p.name for p in fusion_patterns()}
    for layer in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear"):
        assert {f"{layer}_bn_relu", f"{layer}_bn", f"{layer}_relu"} <= names
    lengths = [len(p.sequence) for p in fusion_patterns()]
    assert lengths == sorted(lengths, reverse=True)  # longest first: Conv+BN+ReLU wins over Conv+BN


@pytest.mark.parametrize(("layer", "act"), CASES)
def test_ptq_folds_batch_norm_exactly(layer: str, act: str) -> None:
    model, x = chain(layer, act)
    q = mq.prepare(model, "qdq", (x,))
    qat = _only_layer(q)
    assert type(qat) is QAT_MODULES[type(model[0])]  # plain QAT layer: the BN is gone
    assert _batch_norms(q) == []  # folded, and no stale copy left behind (regression)
    assert (qat.act is None) == (ACTS[act] is None)
    if qat.act is not None:
        assert type(qat.act) is ACTS[act]
    mq.disable_all(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("layer", "act"), [(layer, act) for layer in LAYERS if "frozen" not in layer
                                            for act in ("none", "relu")])
def test_layer_relu_without_bn(layer: str, act: str) -> None:
    model, x = chain(layer, act, bn=False)
    q = mq.prepare(model, "qdq", (x,))
    qat = _only_layer(q)
    assert (qat.act is not None) == (act == "relu")
    assert [n.op for n in q.graph.nodes].count("call_function") == 0
    mq.disable_all(q)
    with torch.no_grad():
        assert torch.equal(q(x), model(x))


@pytest.mark.parametrize(("layer", "act"), CASES)
def test_qat_keeps_batch_norm_for_simulated_folding(layer: str, act: str) -> None:
    model, x = chain(layer, act)
    q = mq.prepare(model, "qdq", (x,), mode="qat")
    qat = _only_layer(q)
    frozen = "frozen" in layer
    assert isinstance(qat, QATBnModule) != frozen  # a frozen BN never trains: folded even in QAT mode
    assert len(_batch_norms(q)) == (0 if frozen else 1)  # only the QAT module's own BN (regression: no stale copy)
    if not frozen:
        assert type(qat) is QAT_MODULES[type(mq.nn.fuse_modules(copy.deepcopy(model[0]), model[1], fold=False))]
        assert qat.bn.momentum == model[1].momentum
    mq.disable_all(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear"])
def test_qat_training_uses_batch_statistics(layer: str) -> None:
    model, x = chain(layer, "relu")
    q = mq.prepare(model, "qdq", (x,), mode="qat")
    mq.disable_all(q)
    q.train()
    reference = copy.deepcopy(model).train()
    out, ref = q(x), reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, model.eval()(x), atol=1e-3)  # batch statistics differ from running ones
    bn = _only_layer(q).bn
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, reference[1].running_var, atol=1e-6, rtol=1e-5)


def test_bn_momentum_and_eps_survive_prepare_in_qat_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.03), nn.ReLU())
    randomized(model[1])
    x = torch.randn(4, 3, 8, 8)
    q = mq.prepare(model.train(), "qdq", (x,), mode="qat")
    bn = _only_layer(q).bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    mq.disable_all(q)
    before = bn.running_mean.clone()
    q(x)
    batch_mean = F.conv2d(x, model[0].weight, model[0].bias).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, 0.97 * before + 0.03 * batch_mean, atol=1e-6, rtol=1e-5)


def test_freeze_bn_makes_training_output_equal_eval_and_deploy() -> None:
    z = ZOO["resnet"]
    model, data = z.build(), z.calibration_data(2, 4)
    q = mq.prepare(model, "qdq", (data[0],), mode="qat")
    mq.calibrate(q, data, progress=False)
    ptq = mq.prepare(model, "qdq", (data[0],), mode="ptq")
    mq.calibrate(ptq, data, progress=False)
    unfrozen = copy.deepcopy(q).train()(data[0])  # batch statistics
    q.train()
    mq.freeze_bn(q)
    stats = {k: v.clone() for k, v in q.state_dict().items() if "running" in k}
    assert stats
    trained = q(data[0])
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in stats.items())  # frozen: statistics not updated
    q.eval()
    evaluated = q(data[0])
    assert torch.equal(trained, evaluated)
    assert not torch.allclose(unfrozen, evaluated, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(evaluated, ptq(data[0]))  # bit for bit the folded deploy model
    mq.unfreeze_bn(q)
    q.train()
    torch.testing.assert_close(q(data[0]), unfrozen, atol=1e-5, rtol=1e-5)


def test_a_conv_called_twice_is_not_fused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = randomized(nn.BatchNorm2d(3))
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn(self.conv(self.conv(x))))

    model, x = Twice().eval(), torch.randn(2, 3, 8, 8)
    for mode in ("ptq", "qat"):
        q = mq.prepare(model, "qdq", (x,), mode=mode)
        assert type(q.conv) is mq.nn.QConv2d and q.conv.act is None
        assert isinstance(q.bn, nn.BatchNorm2d)  # still a standalone BN: folding it would change the first call
        assert [n.target for n in q.graph.nodes if n.op == "call_module" and "fq" not in str(n.target)] == [
            "conv", "conv", "bn", "relu"]
        mq.disable_all(q)
        with torch.no_grad():
            assert torch.equal(q(x), model(x))


def test_a_shared_relu_module_is_not_fused_away() -> None:
    class SharedRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), randomized(nn.BatchNorm2d(4))
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), randomized(nn.BatchNorm2d(4))
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    model, x = SharedRelu().eval(), torch.randn(2, 3, 8, 8)
    q = mq.prepare(model, "qdq", (x,))
    assert q.conv1.act is None and q.conv2.act is None
    assert isinstance(q.relu, nn.ReLU)
    mq.disable_all(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)


def test_functional_relu_spellings_fuse() -> None:
    class Spellings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(4))
            self.bns = nn.ModuleList(randomized(nn.BatchNorm2d(3)) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.bns[0](self.convs[0](x)))
            x = torch.relu(self.bns[1](self.convs[1](x)))
            x = self.bns[2](self.convs[2](x)).relu()
            return F.relu6(self.bns[3](self.convs[3](x)))

    model, x = Spellings().eval(), torch.randn(2, 3, 6, 6)
    q = mq.prepare(model, "qdq", (x,))
    acts = [type(m.act) for m in q.modules() if isinstance(m, QATModule)]
    assert acts == [nn.ReLU, nn.ReLU, nn.ReLU, nn.ReLU6]
    assert [n for n in q.graph.nodes if n.op in ("call_function", "call_method")] == []
    mq.disable_all(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_fold_exactly(name: str) -> None:
    z = ZOO[name]
    model, x = z.build(), z.inputs(2)
    q = mq.prepare(model, "qdq", (x,))
    assert _batch_norms(q) == []  # every BN of the zoo sits after a conv/linear
    mq.disable_all(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)
