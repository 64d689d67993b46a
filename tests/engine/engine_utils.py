"""Helpers shared by the engine tests: backend lookup that skips when a plugin is missing, graph inspection."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch import fx, nn

import mq_core as mq
from mq_core.errors import UnknownNameError
from mq_core.quant.fake_quant import FakeQuantizer

#: Every backend the engine suite exercises (first-party plugins plus the core's qdq).
ALL_BACKENDS = ("qdq", "tensorrt", "openvino", "snpe", "tvm", "tengine")
#: Backends with total-integer (output) placement.
OUTPUT_BACKENDS = ("qdq", "snpe", "tvm", "tengine")
#: Backends with input placement.
INPUT_BACKENDS = ("tensorrt", "openvino")


def deterministic() -> Iterator[None]:
    """Body of each test module's autouse fixture: a fixed seed, and one intra-op thread for the duration of the
    test (the models are tiny; on a loaded 2-core machine a second thread only adds contention, ~4x the run time)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def backend_or_skip(name: str) -> mq.Backend:
    """The backend, or skip the test when its plugin distribution is not installed."""
    try:
        return mq.get_backend(name)
    except UnknownNameError as exc:
        pytest.skip(str(exc))


def modules_of(gm: nn.Module) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def is_fq_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), FakeQuantizer)


def fq_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph nodes that call an activation fake quantizer."""
    modules = modules_of(gm)
    return [n for n in gm.graph.nodes if is_fq_node(n, modules)]


def quantized_producers(gm: fx.GraphModule) -> Counter[str]:
    """How many fake quantizer nodes each node feeds (must be at most one per node)."""
    return Counter(n.args[0].name for n in fq_nodes(gm))


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    found = [n for n in gm.graph.nodes if n.name == name]
    assert found, f"no node {name!r} in {[n.name for n in gm.graph.nodes]}"
    return found[0]


def reads_quantized(gm: fx.GraphModule, name: str) -> list[bool]:
    """For each tensor input of node ``name``: is it the output of a fake quantizer?"""
    modules = modules_of(gm)
    target = node(gm, name)
    return [is_fq_node(a, modules) for a in target.all_input_nodes]


def output_quantized(gm: fx.GraphModule, name: str) -> bool:
    """Whether some fake quantizer reads node ``name``'s output."""
    modules = modules_of(gm)
    return any(is_fq_node(u, modules) for u in node(gm, name).users)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def placements(qmodel: nn.Module, key: str = "") -> list[str]:
    """``mq_info.placements`` in a compact, diff-friendly form: ``tensor -> consumers sign | reason``.

    Also checks the invariant that every quantizer is named after its tensor.
    """
    lines = []
    for record in qmodel.mq_info.placements[key]:
        assert record["quantizer"] == f"{record['tensor']}_fq", record
        consumers = "*" if record["consumers"] == "all" else ",".join(record["consumers"])
        lines.append(f"{record['tensor']} -> {consumers} {'u' if record['unsigned'] else 's'} | {record['reason']}")
    return lines
