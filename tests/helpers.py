"""Helpers shared by the test modules (``tests/`` is on ``sys.path`` through ``tests/conftest.py``): error measures,
fx graph inspection and the digits QAT loop. Backend lists live in ``mq_core.testing.backends``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

import mq_core as mq
from mq_core.demo.digits import DigitsData
from mq_core.quant.fake_quant import FakeQuantizer


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


def train_qat(qmodel: nn.Module, data: DigitsData, epochs: int, freeze_bn_epoch: int, *, lr: float = 5e-4,
              after_step: Callable[[], None] | None = None) -> list[float]:
    """Fine-tune a prepared (and calibrated) QAT model on the digits training set, as the QAT tests do: seeded,
    Adam with a cosine schedule, BatchNorm frozen from ``freeze_bn_epoch`` on (as the deploy model uses it).

    ``after_step`` runs after each optimizer step (to watch state that must stay bounded). Returns the loss of
    every step.
    """
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    losses = []
    for epoch in range(epochs):
        qmodel.train()
        if epoch == freeze_bn_epoch:
            mq.freeze_bn(qmodel)
        for xb, yb in data.train_batches(batch_size=64, seed=epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(qmodel(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if after_step is not None:
                after_step()
        schedule.step()
    return losses
