"""Fusion: replace chains like Conv -> BatchNorm -> ReLU in the fx graph by one fused module.

Patterns are data (``FusionPattern``) registered through ``register_fusion_patterns``; this module holds the one
pass that matches them. A chain matches when each step's node is the only user of the previous one and every
module in it is called exactly once (a shared module is never fused: that would change its other call sites).
Functional activations (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6``, their in-place spellings, and the
ATen operators a ``torch.export`` graph records for all of them) match module steps too and become modules in the
fused result. An in-place activation fuses only when it is the sole user of the layer's output, and later code
reads its result (what torch.export records, and what the chain check requires), so the fused module computes the
same thing out of place.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

#: Functional spellings of the activations that fuse (functions, method names, ATen operators), and the module each
#: becomes. The ATen entries are what torch.export records for the others: ``F.relu(x, inplace=True)`` and
#: ``x.relu_()`` become ``aten.relu_``, ``F.relu6`` becomes ``aten.relu6`` (``aten.relu6_`` in place).
FUNCTIONAL_ACTIVATIONS: dict[Any, type[nn.Module]] = {
    **dict.fromkeys((F.relu, torch.relu, F.relu_, torch.relu_, "relu", "relu_", aten.relu.default,
                     aten.relu_.default), nn.ReLU),
    **dict.fromkeys((F.relu6, aten.relu6.default, aten.relu6_.default), nn.ReLU6),
}


@dataclass(frozen=True)
class ModulePredicate:
    """A step matching modules by a predicate, for types mq cannot import (e.g. torchvision's FrozenBatchNorm2d)."""

    description: str
    test: Callable[[nn.Module], bool]


Step = tuple[type | ModulePredicate | Any, ...]


@dataclass(frozen=True)
class FusionPattern:
    """A chain of steps and the function building its replacement.

    Attributes:
        name: registry name (``conv2d_bn_relu``).
        sequence: one tuple per step; each element is a module type, a ``ModulePredicate``, a function (matches
            ``call_function``) or a method name (matches ``call_method``).
        fuse: ``fuse(modules, mode) -> nn.Module`` with the matched modules (functional steps as modules) and
            ``mode`` "ptq" (fold BN now) or "qat" (keep BN for simulated folding).
    """

    name: str
    sequence: tuple[Step, ...]
    fuse: Callable[[list[nn.Module], str], nn.Module]
    description: str = ""


def _step_module(node: fx.Node, step: Step, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module this node contributes if it matches ``step``, else None."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        for item in step:
            if isinstance(item, type) and type(module) is item:
                return module
            if isinstance(item, ModulePredicate) and item.test(module):
                return module
        return None
    if node.op in ("call_function", "call_method") and node.target in step and node.target in FUNCTIONAL_ACTIVATIONS:
        return FUNCTIONAL_ACTIVATIONS[node.target]()
    return None


def _match(
    start: fx.Node, pattern: FusionPattern, modules: dict[str, nn.Module], calls: Counter[str]
) -> list[tuple[fx.Node, nn.Module]] | None:
    chain: list[tuple[fx.Node, nn.Module]] = []
    node = start
    for i, step in enumerate(pattern.sequence):
        if i:
            users = list(chain[-1][0].users)
            if len(users) != 1:
                return None
            node = users[0]
            if not node.args or node.args[0] is not chain[-1][0]:
                return None
        module = _step_module(node, step, modules)
        if module is None:
            return None
        if node.op == "call_module" and calls[str(node.target)] != 1:
            return None
        chain.append((node, module))
    return chain


def fuse(gm: fx.GraphModule, patterns: Sequence[FusionPattern], mode: str) -> fx.GraphModule:
    """Apply ``patterns`` (longest first) to ``gm`` in place; the fused module takes the first module's name."""
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node in erased:
            continue
        for pattern in patterns:
            chain = _match(node, pattern, modules, calls)
            if chain is None:
                continue
            fused = pattern.fuse([m for _, m in chain], mode)
            _set_submodule(gm, str(node.target), fused)
            modules[str(node.target)] = fused
            last = chain[-1][0]
            last.replace_all_uses_with(node)
            for dead, _ in reversed(chain[1:]):
                gm.graph.erase_node(dead)
                erased.add(dead)
                if dead.op == "call_module":
                    # Delete the absorbed BN/ReLU attribute now: the fused module holds the same object, and
                    # named_modules() de-duplicates, so delete_all_unused_submodules() would never see this name
                    # and a stale copy (its state dict, its parameters) would stay in the prepared model.
                    gm.delete_submodule(str(dead.target))
            break
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
