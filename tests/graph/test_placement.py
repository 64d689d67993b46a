"""Placement: snapshots of ``mq_info.placements`` per backend policy on the zoo, and the rules behind them."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    fq_nodes,
    is_fq_node,
    modules_of,
    placements,
    quantized_producers,
    reads_quantized,
)
from torch import fx, nn

import mq_core as mq
from mq_core.graph.ops import op_kind
from mq_core.graph.policy import PASSTHROUGH_KINDS
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.testing.backends import ALL_BACKENDS, OUTPUT_BACKENDS, backend_or_skip
from mq_core.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("deterministic")


#: Expected ``mq_info.placements[""]`` per policy family ("output": the policy SNPE/TVM/Tengine/qdq share), per zoo
#: model, one line per quantized tensor: ``tensor -> consumers (* = every reader) s|u (signed / unsigned grid) |
#: reason``. Reviewed by hand against the rules in backends.md (TensorRT: inputs of conv/linear/matmul and both add
#: inputs, outputs float; OpenVINO: also the network input, unsigned after ReLU-like producers; the output policy:
#: every compute output, ReLU merged into its producer, layout and max-pool passed through; "qdq": the models where
#: ONNX Runtime's float LayerNorm/GELU make it differ, see docs/backends/qdq.md). After an intended change, regenerate
#: with ``placements(mq.prepare(...))`` from helpers and review the diff.
SNAPSHOTS: dict[str, dict[str, list[str]]] = json.loads(
    (Path(__file__).parent / "placement_snapshots.json").read_text(encoding="utf-8"))


def prepared(backend: str | mq.Backend, name: str, **options: object) -> fx.GraphModule:
    z = ZOO[name]
    return mq.prepare(z.build(), backend, (z.inputs(2),), **options)


@functools.cache
def prepared_once(backend: str, name: str) -> fx.GraphModule:
    """Prepared zoo models shared by the read-only tests below (preparing is most of this file's run time)."""
    return prepared(backend, name)


def expected_snapshot(backend: str, name: str) -> list[str]:
    if name in SNAPSHOTS.get(backend, {}):
        return SNAPSHOTS[backend][name]
    return SNAPSHOTS["output" if backend in OUTPUT_BACKENDS else backend][name]


# --- snapshots --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_placement_snapshot(backend: str, name: str) -> None:
    backend_or_skip(backend)
    q = prepared_once(backend, name)
    assert placements(q) == expected_snapshot(backend, name)
    # the table describes the graph: each record's quantizer module exists and reads its tensor
    modules = modules_of(q)
    for record in q.mq_info.placements[""]:
        fq_node = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == record["quantizer"])
        assert isinstance(modules[record["quantizer"]], FakeQuantizer)
        assert fq_node.args[0].name == record["tensor"]
        readers = sorted(u.name for u in fq_node.users if u.op != "output")
        if record["consumers"] != "all":
            assert readers == sorted(record["consumers"])


# --- rules that hold for every backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_exactly_one_quantizer_per_tensor(backend: str, name: str) -> None:
    backend_or_skip(backend)
    q = prepared_once(backend, name)
    counts = quantized_producers(q)
    assert counts and max(counts.values()) == 1, counts
    modules = modules_of(q)
    assert not any(is_fq_node(n.args[0], modules) for n in fq_nodes(q))  # never quantize a quantized tensor again
    assert len(fq_nodes(q)) == len(q.mq_info.placements[""]) == len(mq.quantizers(q, weights=False))


# --- input placement (TensorRT, OpenVINO) -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize(("backend", "kinds"), [
    ("tensorrt", {"conv", "conv_transpose", "linear", "matmul", "add"}),
    ("openvino", {"conv", "conv_transpose", "linear", "matmul", "add", "sub", "mul", "div"}),
])
def test_input_placement_rules(backend: str, kinds: set[str], name: str) -> None:
    backend_or_skip(backend)
    q = prepared_once(backend, name)
    modules = modules_of(q)
    network_input = backend == "openvino"
    for n in fq_nodes(q):
        if n.args[0].op == "placeholder" and network_input:
            continue  # OpenVINO quantizes the network input for all its readers
        assert {op_kind(u, modules) for u in n.users} <= kinds, f"{n.name} feeds {list(n.users)}"
    for n in q.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method") and op_kind(n, modules) in kinds:
            if not q.mq_info.target.placement.eltwise_before_norm and any(
                    op_kind(u, modules) == "norm" for u in n.users):
                continue  # OpenVINO: a sum a LayerNorm reads stays float (PlacementPolicy.eltwise_before_norm)
            assert all(reads_quantized(q, n.name)), f"{n.name} ({op_kind(n, modules)}) reads a float tensor"
    output = next(n for n in q.graph.nodes if n.op == "output")
    assert not any(is_fq_node(a, modules) for a in output.all_input_nodes), "network output must stay float"


def test_tensorrt_quantizes_both_residual_add_inputs() -> None:
    backend_or_skip("tensorrt")
    q = prepared_once("tensorrt", "resnet")
    adds = [n.name for n in q.graph.nodes if n.op == "call_function" and n.target in (torch.add, operator.add)]
    assert adds == ["add", "add_1", "add_2", "add_3"]
    for add in adds:
        assert reads_quantized(q, add) == [True, True]
    # the block input feeds both the conv and the add through one shared quantizer
    (record,) = [r for r in q.mq_info.placements[""] if r["tensor"] == "pool"]
    assert record["consumers"] == ["layer1_0_conv1", "add"]


# --- output placement (SNPE, TVM, Tengine, qdq) -----------------------------------------------------------------------
class Merging(nn.Module):
    """Activations after ops that cannot fuse with them, and pass-through ops in every position."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.a(x) + self.b(x))  # add -> ReLU module: one quantizer, after the ReLU
        y = F.relu6(self.pool(y) * 2.0)  # scalar mul -> relu6: after the relu6
        y = y.flatten(1).reshape(y.shape[0], -1)  # layout: pass through
        z = self.fc(y[:, :64])  # getitem: pass through
        return z.relu()  # linear + tensor method relu: fused, quantized after it


@pytest.mark.parametrize("backend", OUTPUT_BACKENDS)
def test_output_placement_merges_activations_and_passes_layout_through(backend: str) -> None:
    backend_or_skip(backend)
    x = torch.randn(2, 3, 8, 8)
    q = mq.prepare(Merging().eval(), backend, (x,))
    modules = modules_of(q)
    assert set(quantized_producers(q)) == {"x", "a", "b", "relu", "relu6", "fc"}
    for n in q.graph.nodes:
        kind = op_kind(n, modules) if n.op.startswith("call") else n.op
        if kind in ("relu", "relu6"):
            assert reads_quantized(q, n.name) == [False], f"a quantizer between {n.args[0].name} and {n.name}"
        if kind in PASSTHROUGH_KINDS and n.all_input_nodes:
            assert not any(is_fq_node(u, modules) for u in n.users), f"{n.name} re-quantized"
    assert modules["fc"].act is not None  # x.relu() fused into the Linear
    output = next(n for n in q.graph.nodes if n.op == "output")
    assert all(is_fq_node(a, modules) for a in output.all_input_nodes)  # network outputs are quantized
    mq.calibrate(q, [x, x * 0.5], progress=False)
    # a ReLU sharing its producer's quantizer: the grid starts at the zero point, nothing is below 0
    assert modules["relu_fq"].zero_point.item() == 0


@pytest.mark.parametrize("name", list(ZOO))
def test_output_placement_rules_on_the_zoo(name: str) -> None:
    q = prepared_once("qdq", name)
    modules = modules_of(q)
    float_kinds = mq.get_backend("qdq").placement.float_kinds
    for n in q.graph.nodes:
        if not n.op.startswith("call") or is_fq_node(n, modules):
            continue
        kind = op_kind(n, modules)
        if kind in ("relu", "relu6"):
            assert reads_quantized(q, n.name) == [False]
        if kind in PASSTHROUGH_KINDS and n.all_input_nodes:
            assert not any(is_fq_node(u, modules) for u in n.users)
        if kind in ("conv", "linear", "matmul", "add", "cat", "avgpool", "mean", "softmax"):
            merged = len(n.users) == 1 and op_kind(next(iter(n.users)), modules) in ("relu", "relu6")
            read_in_float = all(op_kind(u, modules) in float_kinds for u in n.users)  # ONNX Runtime's float ops
            assert merged or read_in_float or any(is_fq_node(u, modules) for u in n.users), f"{n.name} ({kind})"


def _through_layout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a fake quantizer's output, looking back through layout ops (reshape, permute, getitem)."""
    while not is_fq_node(node, modules) and op_kind(node, modules) in PASSTHROUGH_KINDS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return is_fq_node(node, modules)


def test_qdq_layernorm_and_gelu_read_float_and_feed_linears_quantized() -> None:
    """ONNX Runtime has no integer LayerNorm or GELU: on the qdq backend they read float inputs (the residual sum,
    the first MLP Linear's output) while every Linear/MatMul reads quantized inputs; the pre-norm block's residual
    sums stay quantized where an integer op (the next add, the mean) reads them, and only for it."""
    q = prepared_once("qdq", "attention")
    modules = modules_of(q)
    assert {"norm", "gelu"} <= mq.get_backend("qdq").placement.float_kinds
    for n in q.graph.nodes:
        kind = op_kind(n, modules) if n.op.startswith("call") and not is_fq_node(n, modules) else ""
        if kind in ("norm", "gelu"):
            assert reads_quantized(q, n.name) == [False], n.name
        if kind in ("linear", "matmul"):
            assert all(_through_layout(a, modules) for a in n.all_input_nodes), n.name
    consumers = {r["tensor"]: r["consumers"] for r in q.mq_info.placements[""]}
    assert consumers["x"] == ["add"] and consumers["add"] == ["add_1"] and "mlp_0" not in consumers
    # the other total-integer targets keep quantizing every compute output
    assert mq.get_backend("qdq").placement.float_kinds and not any(
        mq.get_backend(b).placement.float_kinds for b in ("snpe", "tvm", "tengine") if b in mq.list_backends())


# --- OpenVINO's unsigned grids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "unet", "mlp_bn"])
def test_openvino_unsigned_grids_after_relu_like_producers(name: str) -> None:
    backend_or_skip("openvino")
    z = ZOO[name]
    q = prepared("openvino", name)
    table = {r["quantizer"]: r["unsigned"] for r in q.mq_info.placements[""]}
    assert any(table.values()) and not all(table.values())
    seen: dict[str, torch.Tensor] = {}
    hooks = [fq.register_forward_pre_hook(lambda _m, args, n=qn: seen.setdefault(n, args[0]))
             for qn, fq in mq.quantizers(q, weights=False).items()]
    mq.calibrate(q, z.calibration_data(2, 4), progress=False)
    for h in hooks:
        h.remove()
    for qname, unsigned in table.items():
        fq = q.get_submodule(qname)
        assert fq.scheme.signed != unsigned
        assert fq.scheme.symmetric and fq.zero_point.item() == 0
        if unsigned:
            assert (fq.scheme.qmin, fq.scheme.qmax) == (0, 255)
            assert seen[qname].min() >= 0, f"{qname} is unsigned but saw negative values"
            assert fq.scale.item() == pytest.approx(fq.observer.max_val.item() / 255, rel=1e-6)
        else:
            assert (fq.scheme.qmin, fq.scheme.qmax) == (-128, 127)


# --- network inputs / outputs on and off ------------------------------------------------------------------------------
class EndsInLayout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        return self.fc(y).reshape(-1, 2, 3).flatten(1)  # the network output sits behind two layout ops


def with_policy(policy: mq.PlacementPolicy) -> mq.Backend:
    return dataclasses.replace(mq.get_backend("qdq"), name="qdq-test", placement=policy)


@pytest.mark.parametrize(("inputs", "outputs"), [(True, True), (False, True), (True, False), (False, False)])
def test_output_placement_network_inputs_and_outputs_switches(inputs: bool, outputs: bool) -> None:
    backend = with_policy(mq.output_placement(network_inputs=inputs, network_outputs=outputs))
    q = mq.prepare(EndsInLayout().eval(), backend, (torch.randn(2, 3, 8, 8),))
    expected = {"conv", "mean"} | ({"x"} if inputs else set()) | ({"fc"} if outputs else set())
    assert set(quantized_producers(q)) == expected
    assert q.mq_info.backend == "qdq-test"


def test_network_output_that_is_also_read_inside_stays_quantized_when_outputs_are_off() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return y, torch.sigmoid(y)

    backend = with_policy(mq.output_placement(network_outputs=False))
    q = mq.prepare(Both().eval(), backend, (torch.randn(1, 3, 4, 4),))
    assert set(quantized_producers(q)) == {"x", "conv"}  # conv's output feeds the sigmoid: kept


@pytest.mark.parametrize("inputs", [True, False])
def test_input_placement_network_input_switch(inputs: bool) -> None:
    backend = with_policy(mq.input_placement("conv", "linear", network_inputs=inputs))
    q = mq.prepare(EndsInLayout().eval(), backend, (torch.randn(2, 3, 8, 8),))
    records = {r["tensor"]: r for r in q.mq_info.placements[""]}
    assert set(records) == {"x", "mean"}  # the input is quantized either way: the conv reads it ...
    assert records["x"]["consumers"] == ("all" if inputs else ["conv"])  # ... but only as the conv's input
    assert records["x"]["reason"] == ("network input" if inputs else "input of conv")


# --- skip by name, type and function ----------------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [["fc"], [nn.Linear]], ids=["name", "type"])
@pytest.mark.parametrize("backend", ["tensorrt", "snpe"])
def test_skip_removes_a_layer_from_the_placement(backend: str, skip: list[object]) -> None:
    backend_or_skip(backend)
    q = prepared(backend, "resnet", skip=skip)
    table = q.mq_info.placements[""]
    assert all(r["tensor"] not in ("fc", "avgpool", "flatten") for r in table)
    assert all(r["consumers"] == "all" or "fc" not in r["consumers"] for r in table)
    # TensorRT loses fc's input quantizer; SNPE fc's output quantizer and the avg-pool's, which only fc read
    assert len(table) == len(expected_snapshot(backend, "resnet")) - (1 if backend == "tensorrt" else 2)
    assert reads_quantized(q, "fc") == [False]


def test_skip_by_function_under_output_placement() -> None:
    q = prepared("qdq", "attention", skip=[torch.matmul])
    tensors = {r["tensor"] for r in q.mq_info.placements[""]}
    assert "matmul" not in tensors and "matmul_1" not in tensors
    # q/k/v (via layout ops) and the softmax are read only by the float matmuls: no quantizer just for them
    assert "qkv" not in tensors and "softmax" not in tensors
    # the scaled scores stay quantized for the softmax: a skipped layer does not make float spread backwards
    assert {"x", "norm1", "mul", "proj", "add", "cls"} <= tensors
