"""Shared helpers of ranges-file exporters: a float ONNX plus a side file of per-tensor qparams.

Targets such as SNPE/QNN (AIMET encodings) and Tengine (scale table) do not read Q/DQ nodes: their converters
quantize a float graph with ranges looked up by tensor name. Every such exporter needs the same few things, kept here
so the plugins do not copy them:

* ``propagate_through_passthrough``: these targets quantize *every* layer output and fuse Conv+ReLU, so tensors
  on either side of an op that keeps the grid (max-pool, reshape, ReLU ...) must carry their neighbour's encoding
  too. A tensor missing from the file is silently re-calibrated by SNPE's converter and gets scale 0 in Tengine.
* ``unsigned_view``: both formats describe a grid as unsigned codes ``q in [0, 2^bits - 1]`` plus an offset, so
  a signed grid (int8 symmetric) is re-expressed on that unsigned range with identical dequantized values.
* ``in_graph_order`` / ``check_names`` / ``uncovered_tensors``: deterministic file order, and loud failures or
  warnings instead of silent accuracy loss when names do not match the float ONNX.
* ``rebuild_qdq``: verification of the artifact *as written*: the exporter's reader parses the file back into a
  table, and Q/DQ are put back into the float ONNX from it (``apply_table``), so a runtime can run it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import onnx

from mq_core.errors import ExportError, VerificationError
from mq_core.export.exporter import Runnable
from mq_core.export.onnx_graph import Graph
from mq_core.export.quant_table import QuantTable, TensorQuant, apply_table

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


def check_names(model: onnx.ModelProto, table: QuantTable) -> None:
    """Every table entry must name a tensor of ``model``; a converter ignores names it cannot find."""
    names = set(graph_order(model)) | {i.name for i in model.graph.initializer}
    missing = sorted(set(table) - names)
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


def rebuild_qdq(float_model: onnx.ModelProto, table: QuantTable, artifact: str, description: str) -> Runnable:
    """A runnable QDQ model from the float ONNX and a table parsed back from the artifact's ranges file."""
    names = set(graph_order(float_model)) | {i.name for i in float_model.graph.initializer}
    unknown = sorted(set(table) - names)
    if unknown:
        raise VerificationError(
            f"the {artifact} file names {len(unknown)} tensor(s) the float ONNX does not have: {unknown[:8]}; "
            "the two files do not belong together (re-export both)."
        )
    return Runnable(artifact, apply_table(float_model, table), description)
