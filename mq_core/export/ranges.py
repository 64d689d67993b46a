"""The ranges table: per ONNX tensor, the grid and qparams it is quantized with, and the helpers around it.

It is the common currency of every exporter: built from the deploy view while exporting the canonical QDQ ONNX,
written into manifests, turned into encodings / dynamic ranges / scale tables by the backend plugins, and used
to put Q/DQ back into a float ONNX (``apply_table``) when a ranges-file artifact is verified.

Helpers for targets that read ranges by tensor name instead of Q/DQ nodes (SNPE/QNN, Tengine, TensorRT implicit):

* ``propagate_through_passthrough``: these targets quantize *every* layer output and fuse Conv+ReLU, so tensors
  on either side of an op that keeps the grid (max-pool, reshape, ReLU ...) must carry their neighbour's encoding
  too. A tensor missing from the file is silently re-calibrated by SNPE's converter and gets scale 0 in Tengine.
* ``unsigned_view``: both formats describe a grid as unsigned codes ``q in [0, 2^bits - 1]`` plus an offset, so
  a signed grid (int8 symmetric) is re-expressed on that unsigned range with identical dequantized values.
* ``in_graph_order`` / ``check_names`` / ``uncovered_tensors``: deterministic file order, and loud failures or
  warnings instead of silent accuracy loss when names do not match the float ONNX.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from mq_core.errors import ExportError
from mq_core.export.onnx_graph import Graph, QDQPair, make_node
from mq_core.quant.scheme import QuantScheme

_STORAGE = {(8, True): np.int8, (8, False): np.uint8}


@dataclass
class TensorQuant:
    """How one tensor is quantized: q = clamp(round(x / scale) + zero_point, qmin, qmax)."""

    name: str
    kind: str  # "activation" | "weight"
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None
    quantizer: str = ""

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def storage(self) -> type[np.integer]:
        return _STORAGE[8, self.signed]

    @property
    def min(self) -> np.ndarray:
        """Smallest representable value, (qmin - z) * s."""
        return ((self.qmin - self.zero_point.astype(np.float64)) * self.scale).astype(np.float32)

    @property
    def max(self) -> np.ndarray:
        return ((self.qmax - self.zero_point.astype(np.float64)) * self.scale).astype(np.float32)

    def _qparams_for(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point as float32, shaped to broadcast along ``axis`` of an ``ndim``-dimensional array."""
        s, z = self.scale.astype(np.float32), self.zero_point.astype(np.float32)
        if self.axis is not None:
            shape = [1] * ndim
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return s, z

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Integer codes of ``x`` exactly as ONNX QuantizeLinear computes them (float32 division, half-even)."""
        s, z = self._qparams_for(x.ndim)
        return np.clip(np.round(x.astype(np.float32) / s) + z, self.qmin, self.qmax).astype(self.storage)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s, z = self._qparams_for(q.ndim)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.name, "kind": self.kind, "quantizer": self.quantizer,
            "bits": self.bits, "signed": self.signed, "symmetric": self.symmetric,
            "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis,
            "scale": self.scale.astype(float).tolist(), "zero_point": self.zero_point.astype(int).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorQuant:
        return cls(
            name=data["tensor"], kind=data["kind"], quantizer=data.get("quantizer", ""),
            bits=data["bits"], signed=data["signed"], symmetric=data["symmetric"],
            qmin=data["qmin"], qmax=data["qmax"], axis=data["axis"],
            scale=np.asarray(data["scale"], dtype=np.float32),
            zero_point=np.asarray(data["zero_point"], dtype=np.int64),
        )


QuantTable = dict[str, TensorQuant]


def strip_qdq(model: onnx.ModelProto, table: QuantTable) -> tuple[onnx.ModelProto, QuantTable]:
    """A float ONNX from a QDQ ONNX: activation Q/DQ (and grid Clips) removed, weight DQ folded into float
    initializers holding the dequantized values (which quantize back to the same codes).

    Returns the float model and the table re-keyed by the float model's tensor names (a quantized graph output
    keeps its output name, so the encoding follows it).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    out_table: QuantTable = {}
    pairs: list[QDQPair] = graph.qdq_pairs()
    for pair in pairs:
        if pair.quantize is None:  # weight: int codes + DequantizeLinear -> float initializer
            entry = table[pair.input]
            graph.set_initializer(pair.input, entry.dequantize(graph.array(pair.input)))
            graph.remove_nodes([pair.dequantize])
            graph.rewire(pair.output, pair.input)
            out_table[pair.input] = entry
            continue
        entry = table[pair.input]
        source, output = pair.input, pair.output
        graph.remove_nodes(pair.nodes)
        if output in graph.outputs:
            graph.rename(source, output)
            entry = TensorQuant(**{**entry.__dict__, "name": output})
            out_table[output] = entry
        else:
            graph.rewire(output, source)
            out_table[source] = entry
    graph.remove_unused_initializers()
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model), out_table


def apply_table(model: onnx.ModelProto, table: QuantTable) -> onnx.ModelProto:
    """Put Q/DQ back into a float ONNX from a ranges table (how ranges-file artifacts are verified).

    Activations get QuantizeLinear [-> integer Clip for grids narrower than 8 bits] -> DequantizeLinear after the
    tensor; weights are replaced by their integer codes and a DequantizeLinear.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    new_nodes: list[onnx.NodeProto] = []
    for name, entry in sorted(table.items()):
        s_name, z_name = f"{name}_mq_scale", f"{name}_mq_zero_point"
        graph.set_initializer(s_name, entry.scale.astype(np.float32))
        graph.set_initializer(z_name, entry.zero_point.astype(entry.storage))
        axis = {} if entry.axis is None else {"axis": entry.axis}
        if entry.kind == "weight" and name in graph.initializers:
            codes = entry.quantize(graph.array(name))
            graph.set_initializer(f"{name}_mq_codes", codes)
            deq = f"{name}_mq_dequantized"
            graph.rewire(name, deq)
            new_nodes.append(make_node("DequantizeLinear", [f"{name}_mq_codes", s_name, z_name], [deq],
                                       f"{name}_DequantizeLinear", **axis))
            continue
        source, deq = name, f"{name}_mq_dequantized"
        is_output = name in graph.outputs
        if is_output:  # keep the graph output name on the dequantized tensor
            source = f"{name}_mq_float"
            graph.rename(name, source, graph_outputs=False)
        else:
            graph.rewire(name, deq)
        codes = f"{name}_mq_quantized"
        new_nodes.append(make_node("QuantizeLinear", [source, s_name, z_name], [codes], f"{name}_QuantizeLinear",
                                   **axis))
        if (entry.qmin, entry.qmax) != (np.iinfo(entry.storage).min, np.iinfo(entry.storage).max):
            graph.set_initializer(f"{name}_mq_qmin", np.array(entry.qmin, dtype=entry.storage))
            graph.set_initializer(f"{name}_mq_qmax", np.array(entry.qmax, dtype=entry.storage))
            new_nodes.append(make_node("Clip", [codes, f"{name}_mq_qmin", f"{name}_mq_qmax"], [f"{codes}_clipped"],
                                       f"{name}_Clip"))
            codes = f"{codes}_clipped"
        new_nodes.append(make_node("DequantizeLinear", [codes, s_name, z_name], [name if is_output else deq],
                                   f"{name}_DequantizeLinear", **axis))
    model.graph.node.extend(new_nodes)
    _toposort(model)
    return model


def _toposort(model: onnx.ModelProto) -> None:
    """Order nodes so every input is produced before use (appended Q/DQ nodes move next to their producers)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise ValueError(f"graph has a cycle or a missing input near {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)



def weights_as_device_quantizes(
    model: onnx.ModelProto, weights: QuantTable, scheme: QuantScheme
) -> QuantTable:
    """Weight entries recomputed from the float initializers with a device toolchain's own rule (min/max on
    ``scheme``), for artifacts whose ranges file carries activations only (TensorRT legacy, Tengine).

    ``weights`` gives which initializers are weights and their channel axis (the exported table's entries).
    """
    graph = Graph(model)
    out: QuantTable = {}
    for name, entry in weights.items():
        if entry.kind != "weight" or name not in graph.initializers:
            continue
        values = torch.from_numpy(graph.array(name).astype(np.float32))
        axis = entry.axis if scheme.per_channel else None
        if axis is None:
            lo, hi = values.min(), values.max()
        else:
            flat = values.transpose(0, axis).reshape(values.shape[axis], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        s, z = scheme.qparams(lo, hi)
        out[name] = TensorQuant(
            name=name, kind="weight", quantizer=entry.quantizer, bits=scheme.bits, signed=scheme.signed,
            symmetric=scheme.symmetric, qmin=scheme.qmin, qmax=scheme.qmax, axis=axis,
            scale=s.numpy().astype(np.float32), zero_point=z.numpy().astype(np.int64),
        )
    return out


log = logging.getLogger(__name__)

#: Ops whose first output holds only values of their first input (or 0 / a clip bound), so a quantized input
#: stays on its grid: a Q/DQ with the same qparams on either side changes nothing (Q is monotone and idempotent).
PASSTHROUGH_OPS: frozenset[str] = frozenset({
    "MaxPool", "GlobalMaxPool", "Relu", "Clip", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
    "Identity", "Dropout", "Slice", "Gather", "Expand", "DepthToSpace", "SpaceToDepth",
})


def _renamed(entry: TensorQuant, name: str) -> TensorQuant:
    return dataclasses.replace(entry, name=name)


def propagate_through_passthrough(
    model: onnx.ModelProto, table: QuantTable, ops: Iterable[str] = PASSTHROUGH_OPS
) -> QuantTable:
    """The table plus copies of entries across pass-through ops, both ways, until nothing changes.

    * forward: an op in ``ops`` whose data input (input 0) is quantized and whose output is not gives its output
      the input's entry (max-pool / reshape / ReLU after a quantized tensor keep its encoding);
    * backward: an op in ``ops`` whose output is quantized gives its data input the output's entry when that input
      has no entry, is not a constant, is not a graph output and has this op as its only consumer (Conv -> ReLU:
      the conv output takes the ReLU's encoding, as Tengine's fusion and SNPE's "activation shares its producer's
      encoding" rule do).

    Existing entries are never changed, and per-channel entries are not propagated (their axis would have to be
    remapped through the op). Both directions are exact: for such ops ``Q(op(Q(x))) == Q(op(x))`` with one grid,
    and ``op(Q(x))`` is already on the grid, so a runtime re-applying the copied encodings computes what the
    simulation computed. One exception: forward across a Clip whose bound is off the grid and whose output the
    model left unquantized moves that bound to its nearest level (< 1 step); total-integer placements quantize
    Clip (ReLU6) outputs themselves, so it does not arise there.
    """
    ops = frozenset(ops)
    graph = Graph(model)
    out: QuantTable = dict(table)
    nodes = [n for n in model.graph.node if n.op_type in ops and n.input and n.output]
    changed = True
    while changed:
        changed = False
        for node in nodes:
            source, target = node.input[0], node.output[0]
            entry = out.get(source)
            if entry is not None and not entry.per_channel and target not in out:
                out[target] = _renamed(entry, target)
                changed = True
        for node in reversed(nodes):
            source, target = node.output[0], node.input[0]
            entry = out.get(source)
            if (entry is None or entry.per_channel or target in out or graph.is_constant(target)
                    or target in graph.outputs or len(graph.consumers.get(target, [])) != 1):
                continue
            out[target] = _renamed(entry, target)
            changed = True
    added = sorted(set(out) - set(table))
    log.debug("propagated encodings to %d tensor(s) through pass-through ops: %s", len(added), added)
    return out


def unsigned_view(entry: TensorQuant) -> TensorQuant:
    """The same grid on unsigned codes ``[0, 2^bits - 1]``: ``q_u = q - qmin``, ``z_u = z - qmin``.

    Dequantized values are unchanged, ``(q_u - z_u) * s == (q - z) * s``, so int8 symmetric (z = 0) becomes
    uint8 with z_u = 128. Offset-only formats cannot state a grid of fewer than ``2^bits`` levels.
    """
    if entry.qmax - entry.qmin + 1 != 2**entry.bits:
        raise ExportError(
            f"tensor {entry.name!r} (quantizer {entry.quantizer or '?'}) uses the grid [{entry.qmin}, {entry.qmax}] "
            f"with {entry.bits} bits; this ranges format describes full 2^{entry.bits}-level grids only (no narrow "
            "range). Prepare the model with narrow_range=False for this target."
        )
    return dataclasses.replace(entry, qmin=0, qmax=2**entry.bits - 1, signed=False,
                               zero_point=(entry.zero_point - entry.qmin).astype(entry.zero_point.dtype))


def graph_order(model: onnx.ModelProto) -> list[str]:
    """Every tensor name once, in graph order: inputs, then per node its inputs and outputs (topological)."""
    seen: dict[str, None] = dict.fromkeys(i.name for i in model.graph.input)
    for node in model.graph.node:
        seen.update(dict.fromkeys(n for n in (*node.input, *node.output) if n))
    return list(seen)


def in_graph_order(model: onnx.ModelProto, table: QuantTable) -> list[TensorQuant]:
    """The table's entries in the graph's topological order (the deterministic order of written files)."""
    check_names(model, table)
    return [table[name] for name in graph_order(model) if name in table]


def unknown_names(model: onnx.ModelProto, table: QuantTable) -> list[str]:
    """The table's tensor names that are neither a node output, a graph input nor an initializer of ``model``."""
    names = set(graph_order(model)) | {i.name for i in model.graph.initializer}
    return sorted(set(table) - names)


def check_names(model: onnx.ModelProto, table: QuantTable) -> None:
    """Every table entry must name a tensor of ``model``; a converter ignores names it cannot find."""
    missing = unknown_names(model, table)
    if missing:
        raise ExportError(
            f"{len(missing)} quantized tensor(s) are not tensors of the float ONNX: {missing[:8]}; the target's "
            "converter would silently re-calibrate them. This is a bug in mq's export: please report it."
        )


def uncovered_tensors(model: onnx.ModelProto, table: QuantTable) -> list[str]:
    """Float activation tensors (node outputs) that have no entry: the target quantizes them on its own."""
    graph = Graph(model)
    floats = {v.name for v in (*model.graph.value_info, *model.graph.output)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return [name for name in graph_order(model)
            if name in floats and name in graph.producer and not graph.is_constant(name) and name not in table]
