"""Reconstruction units: which weight layers are optimised together, found on the prepared fx graph.

A *unit* is a contiguous run of graph nodes (in topological order) holding one or more weight layers; the engine
optimises the rounding of those layers so that the unit's output matches the float model's.

* ``layer`` granularity (AdaRound): every weight layer is its own unit, together with the activation quantizer
  that feeds only it.
* ``block`` granularity (BRECQ, QDrop): the graph is cut where a single tensor carries all live state (every path
  from the input to the output passes through it, like a dominator on a linearised graph). A residual block
  (conv-bn-relu, conv-bn, add, relu) has no such cut inside, so it stays whole; a plain chain of layers is cut
  after every layer. Segments without a weight layer join a neighbour: those before the first activation
  quantizer (the ReLU after a residual add) end the previous unit, the rest (that quantizer, pooling, flatten)
  start the next, so each unit starts with the quantizer of its input; trailing ones join the last unit.

Units never end with their output quantizer: it is the next unit's input quantizer. QDrop's random drop and
activation-scale learning therefore act on the quantization of each unit's inputs, as in the QDrop reference
code, where block outputs are quantized at the input of the following block.

``blocks`` (module-name prefixes, e.g. ``("layer1",)`` for a whole stage) forces the nodes of each named module
into one unit. A forced group is widened to the cut points around it, because a group that splits a residual path
cannot be reconstructed on its own; two prefixes that end up in the same residual path are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import fx, nn

from mq_core.plugin_api import ConfigError, FakeQuantizer

Granularity = Literal["layer", "block"]


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit.

    Attributes:
        name: a readable name (the common module prefix of its layers, or the forced prefix).
        nodes: fx node names of the unit, in graph order.
        layers: qualified names of the weight layers whose rounding it learns.
        inputs: fx nodes outside the unit whose values it reads (cached from the quantized model).
        outputs: fx nodes of the unit read after it (compared with the float model's values).
    """

    name: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def reconstructable_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A QAT layer whose weight is quantized (a layer with quantization switched off has no rounding to learn)."""
    if node.op != "call_module":
        return False
    fq = getattr(modules[str(node.target)], "weight_fake_quant", None)
    return isinstance(fq, FakeQuantizer) and bool(fq.quant_enabled.item())


def _is_activation_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), FakeQuantizer)


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


def _cuts(gm: fx.GraphModule, order: list[fx.Node]) -> set[int]:
    """Positions ``i`` after which ``order[i]`` is the only live value (constants from get_attr excluded)."""
    pos = {n: i for i, n in enumerate(order)}
    end = len(order)
    last_use: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        uses = [end if u.op == "output" else pos[u] for u in node.users if u.op != "get_attr"]
        last_use[node] = max(uses, default=-1)
    # live[i] = #values defined at or before i (placeholders count as defined before 0) and used after i.
    delta = [0] * (end + 1)
    for node, last in last_use.items():
        born = pos.get(node, -1)
        if last > born:
            delta[max(born, 0)] += 1
            delta[last] -= 1
    cuts, live = set(), 0
    for i in range(end):
        live += delta[i]
        if live == 1 and last_use[order[i]] > i:
            cuts.add(i)
    return cuts


def _belongs(node: fx.Node, prefix: str) -> bool:
    paths = [str(node.target)] if node.op == "call_module" else []
    paths += list(node.meta.get("nn_module_stack", {}))
    return any(p == prefix or p.startswith(prefix + ".") for p in paths)


def _unit_name(layers: Sequence[str]) -> str:
    if len(layers) == 1:
        return layers[0]
    common: list[str] = []
    for parts in zip(*(name.split(".") for name in layers)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) if common else f"{layers[0]}..{layers[-1]}"


def _boundary(nodes: list[fx.Node]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    inside = set(nodes)
    inputs: dict[str, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                inputs[arg.name] = None
    outputs = tuple(n.name for n in nodes if any(u not in inside for u in n.users))
    return tuple(inputs), outputs


def _make_unit(nodes: list[fx.Node], modules: dict[str, nn.Module], name: str | None = None) -> Unit:
    layers = tuple(str(n.target) for n in nodes if reconstructable_layer(n, modules))
    inputs, outputs = _boundary(nodes)
    return Unit(name or _unit_name(layers), tuple(n.name for n in nodes), layers, inputs, outputs)


def _layer_units(order: list[fx.Node], modules: dict[str, nn.Module]) -> list[Unit]:
    units = []
    for i, node in enumerate(order):
        if not reconstructable_layer(node, modules):
            continue
        nodes = [node]
        before = order[i - 1] if i else None
        if before is not None and _is_activation_quantizer(before, modules) and set(before.users) == {node}:
            nodes.insert(0, before)
        units.append(_make_unit(nodes, modules))
    return units


def _atoms(order: list[fx.Node], cuts: set[int], blocks: Sequence[str]) -> list[tuple[list[fx.Node], str | None]]:
    """Cut segments, with the segments overlapping each forced prefix merged into one (named) atom."""
    segments: list[list[fx.Node]] = [[]]
    for i, node in enumerate(order):
        segments[-1].append(node)
        if i in cuts and i != len(order) - 1:
            segments.append([])
    forced_of: dict[int, str] = {}
    for prefix in blocks:
        hit = [k for k, seg in enumerate(segments) if any(_belongs(n, prefix) for n in seg)]
        if not hit:
            raise ConfigError(f"blocks: no module of the prepared model is named {prefix!r} or lies under it.")
        for k in range(hit[0], hit[-1] + 1):
            other = forced_of.setdefault(k, prefix)
            if other != prefix:
                raise ConfigError(
                    f"blocks {other!r} and {prefix!r} share a residual path (no single tensor separates them), so "
                    "they cannot be reconstructed as separate units; name their common parent instead."
                )
    atoms: list[tuple[list[fx.Node], str | None]] = []
    for k, seg in enumerate(segments):
        name = forced_of.get(k)
        if name is not None and atoms and atoms[-1][1] == name:
            atoms[-1][0].extend(seg)
        else:
            atoms.append((list(seg), name))
    return atoms


def _block_units(gm: fx.GraphModule, order: list[fx.Node], modules: dict[str, nn.Module],
                 blocks: Sequence[str]) -> list[Unit]:
    groups: list[tuple[list[fx.Node], str | None]] = []
    pending: list[fx.Node] = []
    for nodes, forced in _atoms(order, _cuts(gm, order), blocks):
        if not any(reconstructable_layer(n, modules) for n in nodes):
            pending += nodes
            continue
        # Weightless nodes up to the first activation quantizer finish the previous unit (a ReLU after a residual
        # add); from that quantizer on they start this one.
        split = next((i for i, n in enumerate(pending) if _is_activation_quantizer(n, modules)), len(pending))
        if groups:
            groups[-1][0].extend(pending[:split])
            pending = pending[split:]
        groups.append((pending + nodes, forced))
        pending = []
    if pending and groups:
        groups[-1][0].extend(pending)
    empty = [p for p in blocks if p not in {forced for _, forced in groups}]
    if empty:
        raise ConfigError(f"blocks {empty} hold no weight layer with quantized weights; there is nothing to group.")
    return [_make_unit(nodes, modules, forced) for nodes, forced in groups]


def discover_units(gm: fx.GraphModule, granularity: Granularity, blocks: Sequence[str] = ()) -> list[Unit]:
    """The reconstruction units of a prepared GraphModule, in graph order.

    Raises ``ConfigError`` when the model has no weight layer with quantization enabled, or when ``blocks`` names
    a module that does not exist or splits a residual path.
    """
    modules = dict(gm.named_modules())
    order = _compute_nodes(gm)
    if not any(reconstructable_layer(n, modules) for n in order):
        raise ConfigError(
            "nothing to reconstruct: the prepared model has no weight layer (Conv/Linear) with weight quantization "
            "enabled. PTQ reconstruction learns weight rounding; prepare a model with quantized weight layers."
        )
    if granularity == "layer":
        if blocks:
            raise ConfigError("blocks apply to block-wise reconstruction (brecq, qdrop), not to layer-wise adaround.")
        return _layer_units(order, modules)
    return _block_units(gm, order, modules, blocks)
