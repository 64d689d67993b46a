"""ONNX graph helpers shared by every exporter (built on the ``onnx`` package only).

Backend plugins transform the canonical QDQ ONNX with these instead of writing their own graph surgery: find Q/DQ
pairs, read and write initializers, rename tensors, replace nodes, and serialise deterministically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mq_core.io import atomic_write_bytes


@dataclass
class QDQPair:
    """QuantizeLinear [-> integer Clip] -> DequantizeLinear (``quantize`` is None for a weight's lone
    DequantizeLinear; ``clip`` enforces a grid narrower than the 8-bit storage type)."""

    quantize: onnx.NodeProto | None
    dequantize: onnx.NodeProto
    clip: onnx.NodeProto | None = None

    @property
    def input(self) -> str:
        """The float tensor being quantized, or the integer initializer for weights."""
        return (self.quantize or self.dequantize).input[0]

    @property
    def output(self) -> str:
        return self.dequantize.output[0]

    @property
    def scale(self) -> str:
        return self.dequantize.input[1]

    @property
    def zero_point(self) -> str:
        return self.dequantize.input[2]

    @property
    def axis(self) -> int | None:
        for attr in self.dequantize.attribute:
            if attr.name == "axis":
                return attr.i
        return None

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return [n for n in (self.quantize, self.clip, self.dequantize) if n is not None]


class Graph:
    """An index over a ModelProto's graph: producers, consumers and initializers by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.reindex()

    def reindex(self) -> None:
        g = self.model.graph
        self.initializers = {i.name: i for i in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input]

    # --- initializers ---------------------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_<k>`` if a tensor of that name exists (for tensors a rewrite adds)."""
        taken = set(self.producer) | set(self.initializers) | set(self.inputs)
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def array(self, name: str) -> np.ndarray:
        """Value of an initializer or of a Constant node's output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        raise KeyError(f"{name} is not a constant in this graph")

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or getattr(self.producer.get(name), "op_type", "") == "Constant"

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.array(value, order="C"), name)  # keeps 0-d scalars 0-d
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.initializers[name] = self.model.graph.initializer[-1]

    # --- Q/DQ -----------------------------------------------------------------------------------------------
    def qdq_pairs(self) -> list[QDQPair]:
        """Every DequantizeLinear with its QuantizeLinear and integer grid Clip (when present)."""
        pairs = []
        for node in self.model.graph.node:
            if node.op_type != "DequantizeLinear":
                continue
            clip = self.producer.get(node.input[0])
            clip = clip if clip is not None and clip.op_type == "Clip" else None
            q = self.producer.get((clip or node).input[0])
            if q is None or q.op_type != "QuantizeLinear":
                q, clip = None, None
            pairs.append(QDQPair(q, node, clip))
        return pairs

    # --- editing --------------------------------------------------------------------------------------------
    # Nodes are identified by their output names (unique in SSA form), not by object identity: protobuf copies
    # messages when a repeated field is rebuilt, so references held by callers go stale.
    def remove_nodes(self, nodes: Iterable[onnx.NodeProto]) -> None:
        doomed = {tuple(n.output) for n in nodes}
        keep = [n for n in self.model.graph.node if tuple(n.output) not in doomed]
        del self.model.graph.node[:]
        self.model.graph.node.extend(keep)
        self.reindex()

    def replace_nodes(self, old: Iterable[onnx.NodeProto], new: Iterable[onnx.NodeProto]) -> None:
        """Replace ``old`` nodes by ``new`` ones, inserted where the first old node was (keeps topological order)."""
        old_keys = {tuple(n.output) for n in old}
        nodes = list(self.model.graph.node)
        first = next(i for i, n in enumerate(nodes) if tuple(n.output) in old_keys)
        kept = [n for n in nodes[:first] if tuple(n.output) not in old_keys]
        rest = [n for n in nodes[first:] if tuple(n.output) not in old_keys]
        del self.model.graph.node[:]
        self.model.graph.node.extend([*kept, *new, *rest])
        self.reindex()

    def rewire(self, old: str, new: str) -> None:
        """Make every consumer (and graph output) of tensor ``old`` read ``new`` instead."""
        for node in self.model.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for out in self.model.graph.output:
            if out.name == old:
                out.name = new
        self.reindex()

    def rename(self, old: str, new: str, graph_outputs: bool = True) -> None:
        """Rename tensor ``old`` everywhere: producers, consumers, graph inputs/outputs, value_info, initializers.

        With ``graph_outputs=False`` a graph output keeps its name (the caller produces it anew).
        """
        if old == new:
            return
        g = self.model.graph
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        for coll in (g.input, g.output if graph_outputs else (), g.value_info, g.initializer):
            for item in coll:
                if item.name == old:
                    item.name = new
        self.reindex()

    def remove_unused_initializers(self) -> None:
        used = {i for n in self.model.graph.node for i in n.input} | set(self.outputs)
        keep = [i for i in self.model.graph.initializer if i.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)
        self.reindex()


def make_node(op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: object
              ) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Check and write ``model`` atomically, all tensors inline (one self-contained file)."""
    onnx.checker.check_model(model)
    return atomic_write_bytes(path, model.SerializeToString(deterministic=True))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
