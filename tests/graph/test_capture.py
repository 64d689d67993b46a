"""Capture: shared modules, functional/method ops, untraceable code, leaf modules, sub-module and skip selection,
eager-mode (torch.ao-style) models."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    fq_nodes,
    modules_of,
    output_quantized,
    quantized_producers,
    reads_quantized,
    rel_err,
)
from torch import nn
from torch.ao.nn.quantized import FloatFunctional, FXFloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

import mq_core as mq
from mq_core.nn import QATModule
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.testing.backends import OUTPUT_BACKENDS, backend_or_skip

pytestmark = pytest.mark.usefixtures("deterministic")


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def weight_quantized(qmodel: nn.Module) -> set[str]:
    return {name for name, m in qmodel.named_modules() if isinstance(getattr(m, "weight_fake_quant", None),
                                                                     FakeQuantizer)}


# --- a module called twice ------------------------------------------------------------------------------------------
class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.conv(y) + self.conv(torch.sigmoid(y))


@pytest.mark.parametrize("backend", ["snpe", "tensorrt"])
def test_module_called_twice_gets_separate_activation_quantizers(backend: str) -> None:
    backend_or_skip(backend)
    q = mq.prepare(SharedConv().eval(), backend, (X,))
    calls = [n for n in q.graph.nodes if n.op == "call_module" and n.target == "conv"]
    assert [n.name for n in calls] == ["conv", "conv_1"]
    modules = modules_of(q)
    if backend == "snpe":  # output placement: one quantizer per call's output
        outs = [next(u for u in n.users if isinstance(modules.get(str(u.target)), FakeQuantizer)) for n in calls]
    else:  # input placement: one quantizer per call's input
        outs = [n.args[0] for n in calls]
    assert all(isinstance(modules[str(o.target)], FakeQuantizer) for o in outs)
    assert modules[str(outs[0].target)] is not modules[str(outs[1].target)]
    assert weight_quantized(q) == {"stem", "conv"}  # one weight, one weight quantizer
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    mq.calibrate(q, data, progress=False)
    assert modules[str(outs[0].target)].scale != modules[str(outs[1].target)].scale  # calibrated separately


# --- functional and method calls ------------------------------------------------------------------------------------
class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv(x))
        b = self.conv2(a)
        c = torch.add(a, b)
        d = c + b
        e = torch.cat([d, a], dim=1)
        f = F.interpolate(e, scale_factor=0.5, mode="nearest")
        g = f.mean(dim=(2, 3))
        h = self.fc(g)
        k = torch.matmul(h.unsqueeze(2), h.unsqueeze(1))
        return k.flatten(1).reshape(-1, 36)


def test_functional_and_method_ops_under_output_placement() -> None:
    model = Functional().eval()
    q = mq.prepare(model, "qdq", (X,))
    quantized = set(quantized_producers(q))
    # F.relu is fused into the conv (one quantizer after the ReLU); every compute op's output is quantized ...
    assert quantized == {"x", "conv", "conv2", "add", "add_1", "cat", "interpolate", "mean", "fc", "matmul"}
    # ... layout ops pass the grid through
    assert not output_quantized(q, "flatten") and not output_quantized(q, "reshape")
    assert not output_quantized(q, "unsqueeze")
    kinds = {n.name: n.target for n in q.graph.nodes if n.op == "call_function"}
    assert kinds["add"] is torch.add and kinds["cat"] is torch.cat and kinds["matmul"] is torch.matmul
    mq.calibrate(q, [X, X * 0.5], progress=False)
    with torch.no_grad():
        assert rel_err(q(X), model(X)) < 0.1


def test_functional_and_method_ops_under_input_placement() -> None:
    backend_or_skip("tensorrt")
    q = mq.prepare(Functional().eval(), "tensorrt", (X,))
    assert reads_quantized(q, "conv") == [True]
    assert reads_quantized(q, "conv2") == [True]
    assert reads_quantized(q, "add") == [True, True]  # torch.add
    assert reads_quantized(q, "add_1") == [True, True]  # x + y
    assert reads_quantized(q, "fc") == [True]  # input is the mean
    assert reads_quantized(q, "matmul") == [True, True]
    assert reads_quantized(q, "cat") == [False, False]  # concat is transparent for TensorRT
    assert reads_quantized(q, "interpolate") == [False]
    graph_output = next(n for n in q.graph.nodes if n.op == "output")
    assert not any(isinstance(modules_of(q).get(str(a.target)), FakeQuantizer) for a in graph_output.all_input_nodes)


# --- untraceable models ---------------------------------------------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), DataDependent())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _line_of(text: str, obj: object) -> int:
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_untraceable_model_raises_trace_error_naming_module_and_line() -> None:
    with pytest.raises(mq.TraceError) as info:
        mq.prepare(Untraceable().eval(), "qdq", (X,))
    message = str(info.value)
    assert "inside module 'body.1'" in message
    assert f"{Path(__file__).name}:{_line_of('if x.sum() > 0', DataDependent.forward)}" in message
    assert "if x.sum() > 0" in message
    assert 'leaf_modules=["body.1"]' in message
    assert "modules=[" in message
    assert isinstance(info.value, mq.MQError)


@pytest.mark.parametrize("leaf", ["body.1", DataDependent], ids=["by-name", "by-type"])
def test_leaf_modules_make_it_traceable(leaf: str | type) -> None:
    model = Untraceable().eval()
    q = mq.prepare(model, "qdq", (X,), leaf_modules=[leaf])
    assert isinstance(q, torch.fx.GraphModule)
    assert any(n.op == "call_module" and n.target == "body.1" for n in q.graph.nodes)
    assert weight_quantized(q) == {"stem", "head"}  # the leaf stays float inside
    assert type(q.get_submodule("body.1.conv")) is nn.Conv2d
    mq.calibrate(q, [X, -X], progress=False)
    with torch.no_grad():
        assert rel_err(q(X), model(X)) < 0.1


# --- quantize a sub-module only -------------------------------------------------------------------------------------
class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).mean(dim=(2, 3))
        if y.sum() > 0:  # untraceable outside the backbone
            y = y * 2
        return self.head(y)


@pytest.mark.parametrize("backend", ["snpe", "tensorrt"])
def test_quantize_only_the_backbone(backend: str) -> None:
    backend_or_skip(backend)
    model = Detector().eval()
    with pytest.raises(mq.TraceError):
        mq.prepare(model, backend, (X,))
    q = mq.prepare(model, backend, (X,), modules=["backbone"])
    assert isinstance(q.backbone, torch.fx.GraphModule) and not isinstance(q, torch.fx.GraphModule)
    assert type(q.head) is nn.Linear  # float, untouched
    assert all(name.startswith("backbone.") for name in mq.quantizers(q))
    assert weight_quantized(q) == {"backbone.0", "backbone.3"}
    assert list(q.mq_info.placements) == ["backbone"]
    mq.calibrate(q, [X, X * 0.5], progress=False)
    with torch.no_grad():
        assert rel_err(q(X), model(X)) < 0.1


def test_unknown_sub_module_is_a_config_error() -> None:
    with pytest.raises(mq.ConfigError, match="neck"):
        mq.prepare(Detector().eval(), "qdq", (X,), modules=["neck"])


def test_sub_module_probe_run_leaves_batch_norm_statistics_alone() -> None:
    """Regression: finding the backbone's inputs ran the float model in training mode (QAT), which updated every
    BatchNorm's running statistics with the example inputs."""
    model = Detector().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = mq.prepare(model, "qdq", (X * 3 + 1,), mode="qat", modules=["backbone"])
    qat_bn = q.backbone.get_submodule("0").bn
    assert torch.equal(qat_bn.running_mean, before["backbone.1.running_mean"])
    assert torch.equal(qat_bn.running_var, before["backbone.1.running_var"])
    assert qat_bn.num_batches_tracked.item() == 0
    assert q.training and q.backbone.training and q.head.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the float model untouched


# --- skip ------------------------------------------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv3(torch.sigmoid(self.conv2(y)))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("backend", ["tensorrt", "snpe", "openvino", "qdq"])
def test_skipped_layers_stay_float(backend: str) -> None:
    backend_or_skip(backend)
    model = Plain().eval()
    q = mq.prepare(model, backend, (X,), skip=["conv1", "fc"])
    assert weight_quantized(q) == {"conv2", "conv3"}
    assert not isinstance(q.conv1, QATModule) and not isinstance(q.fc, QATModule)
    for name in ("conv1", "fc"):
        assert reads_quantized(q, name) == [False], f"{name} reads a quantized tensor"
    if q.mq_info.backend in OUTPUT_BACKENDS:
        # total integer: no output quantizer for a skipped layer, and none placed only for it to read (fc's input)
        assert not output_quantized(q, "conv1") and not output_quantized(q, "fc")
        assert not output_quantized(q, "mean")
    else:
        # input placement: conv1's output is quantized for conv2 only, which is conv2's input quantizer
        (record,) = [r for r in q.mq_info.placements[""] if r["tensor"] == "conv1"]
        assert record["consumers"] == ["conv2"]
    assert reads_quantized(q, "conv3") == [True]
    mq.calibrate(q, [X, X * 0.5], progress=False)
    with torch.no_grad():
        assert rel_err(q(X), model(X)) < 0.1


def test_skip_by_type_covers_fused_layers() -> None:
    """Regression: skip=[nn.Conv2d] missed convs fused with their BN/ReLU (the fused container is not a Conv2d),
    so they still got a weight quantizer."""
    for mode in ("ptq", "qat"):
        q = mq.prepare(Plain().eval(), "qdq", (X,), skip=[nn.Conv2d], mode=mode)
        assert weight_quantized(q) == {"fc"}, mode
        assert not output_quantized(q, "conv1") and not output_quantized(q, "conv2")


def test_skip_by_function() -> None:
    backend_or_skip("tensorrt")
    q = mq.prepare(Functional().eval(), "tensorrt", (X,), skip=[torch.matmul, torch.add])
    assert reads_quantized(q, "matmul") == [False, False]
    assert reads_quantized(q, "add") == [False, False]
    assert reads_quantized(q, "add_1") == [True, True]  # `c + b` is operator.add, not torch.add
    assert "torch:matmul" in q.mq_info.skip


# --- eager-mode quantization models ---------------------------------------------------------------------------------
class EagerModel(nn.Module):
    """A model written for torch.ao eager-mode quantization."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.f_add, self.f_add_relu, self.f_mul = FloatFunctional(), FloatFunctional(), FloatFunctional()
        self.f_add_scalar, self.f_mul_scalar, self.f_cat = FloatFunctional(), FloatFunctional(), FloatFunctional()
        self.fx_add = FXFloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        a, b = self.conv1(x), self.conv2(x)
        y = self.f_add.add(a, b)
        y = self.f_add_relu.add_relu(y, a)
        y = self.f_mul.mul(y, b)
        y = self.f_add_scalar.add_scalar(y, 1.0)
        y = self.f_mul_scalar.mul_scalar(y, 0.5)
        y = self.fx_add.add(y, a)
        y = self.f_cat.cat([y, a], dim=1)
        return self.dequant(y)


@pytest.mark.parametrize("backend", ["qdq", "tensorrt"])
def test_eager_mode_models_become_plain_ops(backend: str) -> None:
    backend_or_skip(backend)
    model = EagerModel().eval()
    q = mq.prepare(model, backend, (X,))
    leftovers = [type(m).__name__ for m in q.modules()
                 if isinstance(m, (QuantStub, DeQuantStub, FloatFunctional, FXFloatFunctional, nn.Identity))]
    assert leftovers == []
    targets = [n.target for n in q.graph.nodes if n.op == "call_function"]
    assert targets == [torch.add, torch.add, F.relu, torch.mul, torch.add, torch.mul, torch.add, torch.cat]
    mq.disable_all(q)
    with torch.no_grad():
        assert torch.equal(q(X), model(X))
    if backend == "qdq":
        assert set(quantized_producers(q)) == {
            "x", "conv1", "conv2", "add", "relu", "mul", "add_2", "mul_1", "add_3", "cat",
        }
    else:
        assert reads_quantized(q, "add") == [True, True] and reads_quantized(q, "add_3") == [True, True]
        assert reads_quantized(q, "cat") == [False, False]
    assert all(count == 1 for count in quantized_producers(q).values())
    mq.calibrate(q, [X, X * 0.5], progress=False)
    with torch.no_grad():
        assert rel_err(q(X), model(X)) < 0.1


def test_fq_helpers_see_weight_quantizers_as_modules_not_nodes() -> None:
    q = mq.prepare(SharedConv().eval(), "qdq", (X,))
    assert len(fq_nodes(q)) == len(mq.quantizers(q, weights=False))


def test_preserved_attributes_are_copied_and_survive_deepcopy() -> None:
    model = SharedConv().eval()
    model.labels = ["cat", "dog"]
    q = mq.prepare(model, "qdq", (X,), preserved_attributes=["labels"])
    assert q.labels == ["cat", "dog"]
    assert copy.deepcopy(q).labels == ["cat", "dog"]
    with pytest.raises(mq.TraceError, match="preserved attribute 'colors'"):
        mq.prepare(model, "qdq", (X,), preserved_attributes=["colors"])
