"""Per-layer qconfigs: which QConfig (or float) each node of a captured graph gets, from module-path patterns.

``prepare(model, backend, x, qconfig={"layer4": "w8a8", "*": "w4a8"})`` resolves the names to QConfigs (pipeline)
and hands this layer a ``LayerQConfigs``: rules ``(pattern, QConfig | None)``, ``None`` meaning "leave in float".

Matching. A node's names are its own name (``relu_1``), its module path (``layer4.0.conv1`` for a module call; for
a function call, the innermost module it runs in) and that path's ancestors (``layer4.0``, ``layer4``). A pattern
matches a node when it matches one of them with ``fnmatch`` rules (``*``, ``?``, ``[...]``), so ``layer4`` covers
the whole sub-tree. The most specific matching pattern wins: one naming the node itself (its name or its own
module path) beats one naming an ancestor; then the pattern with more path components; then a pattern without
wildcards; then the longer one. ``"*"`` is the least specific of all (the default).

Ownership (the rule every quantizer follows). A weight belongs to its layer. An activation quantizer takes the
qconfig of the node producing the tensor; when that is a network input (or a constant), or a layer left in float,
it takes the qconfig of the first consumer (in graph order) that is quantized.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import fx

from mq_core.graph.capture import SCOPE_META
from mq_core.quant.qconfig import QConfig

#: The default pattern: every node no other pattern matches.
DEFAULT_PATTERN = "*"
_WILDCARDS = frozenset("*?[")


def module_path(node: fx.Node) -> str:
    """The module a node belongs to: its own for a module call, else the innermost module it runs in ("" for the
    root). fx records the module stack as ``nn_module_stack``; torch.export graphs as ``SCOPE_META``."""
    if node.op == "call_module":
        return str(node.target)
    scope = node.meta.get(SCOPE_META) or tuple(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
    return scope[-1] if scope else ""


def layer_name(node: fx.Node) -> str:
    """The name a layer is known by in per-layer qconfigs and reports: the module path of a module call, the node
    name of anything else (``relu_1``, ``add``)."""
    return str(node.target) if node.op == "call_module" else node.name


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def specificity(pattern: str, node: fx.Node) -> tuple[int, int, int, int] | None:
    """How specifically ``pattern`` names ``node`` (larger is more specific), or None when it does not match."""
    if pattern == DEFAULT_PATTERN:
        return (0, 0, 0, 0)
    own = {node.name} | ({str(node.target)} if node.op == "call_module" else set())
    path = module_path(node)
    inherited = ([path] if node.op != "call_module" and path else []) + _ancestors(path)
    if any(fnmatchcase(name, pattern) for name in own):
        rank = 2
    elif any(fnmatchcase(name, pattern) for name in inherited):
        rank = 1
    else:
        return None
    return (rank, pattern.count(".") + 1, int(not _WILDCARDS & set(pattern)), len(pattern))


def pattern_matches_name(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches the module or node ``name`` itself or one of its ancestors."""
    return pattern == DEFAULT_PATTERN or any(fnmatchcase(n, pattern) for n in [name, *_ancestors(name)])


@dataclass(frozen=True)
class LayerQConfigs:
    """Per-layer qconfigs: ``rules`` of ``(pattern, QConfig or None for float)``; ``default`` for nodes no rule
    matches (``"*"``, when given, is a rule of its own and so may also be float)."""

    default: QConfig
    rules: tuple[tuple[str, QConfig | None], ...] = ()

    def for_node(self, node: fx.Node) -> QConfig | None:
        """The qconfig of ``node`` (None: float), by the most specific matching pattern."""
        best: tuple[tuple[int, int, int, int], QConfig | None] | None = None
        for pattern, qconfig in self.rules:
            score = specificity(pattern, node)
            if score is not None and (best is None or score > best[0]):
                best = (score, qconfig)
        return self.default if best is None else best[1]

    def float_nodes(self, graph: fx.Graph) -> set[str]:
        """Names of the computing nodes left in float."""
        return {n.name for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")
                and self.for_node(n) is None}

    def owner(self, producer: fx.Node, consumers: Iterable[fx.Node]) -> fx.Node:
        """The node whose qconfig an activation quantizer takes (see the module docstring)."""
        if producer.op not in ("placeholder", "get_attr") and self.for_node(producer) is not None:
            return producer
        order = {n: i for i, n in enumerate(producer.graph.nodes)}
        for consumer in sorted(consumers, key=order.__getitem__):
            if self.for_node(consumer) is not None:
                return consumer
        return producer
