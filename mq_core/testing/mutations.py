"""Mutations: one deployment bug planted inside an export folder, to prove that a verifier catches it.

A verifier that passes every correct export proves little until it also fails the wrong ones. Each function here
edits one tensor's quantization inside an export folder's artifacts, as a buggy exporter or a hand edit would, and
re-seals the manifest's file checksums (``update_checksums``) so that the folder loads like an untouched one. The
manifest's quantizer table is left as the export wrote it: a verifier must judge with the prepared model, not
with what the folder claims. Every function edits the folder in place (``copy_export`` makes a copy to edit) and
returns the name of the tensor it mutated, so a test can check that the report names it::

    from mq_core.testing import mutations

    broken = mutations.copy_export(result, tmp_path / "broken")
    tensor = mutations.scale_activation(broken, "layers_3_conv1")
    report = mq.verify(mq.ExportResult.load(broken.out_dir), x, qmodel=qmodel)
    assert not report.passed

The mutations, each a bug seen in real exporters:

* ``scale_activation``: one activation's scale times ``factor`` (1.25), in its QuantizeLinear and
  DequantizeLinear;
* ``shift_zero_point``: one activation's zero point off by one in its DequantizeLinear only (Q and DQ disagree);
* ``drop_qdq``: one activation's QuantizeLinear [-> Clip] -> DequantizeLinear removed, its readers rewired to
  the float tensor;
* ``per_tensor_weight``: one weight quantized per tensor where it was per channel (codes and scale rewritten);
* ``round_half_away``: one QuantizeLinear replaced by a subgraph that rounds half away from zero, where
  QuantizeLinear (and the simulation) round half to even;
* ``drop_clip``: the integer Clip of one sub-8-bit grid removed, so its codes use the full 8-bit storage range.

Where they apply: every Q/DQ ONNX artifact (what ``QDQExporter`` writes, and any ONNX with QuantizeLinear [->
Clip] -> DequantizeLinear); ONNX with OpenVINO's ``FakeQuantize`` (scale, zero point and dropped pair: its limits
are edited, or the node removed); and the side files of ``RangesFileExporter`` subclasses (scale, and dropped pair
with the entry's copies across pass-through ops), rewritten through the exporter's own reader and
``write_ranges`` after checking that doing so without the mutation reproduces each file byte for byte (a file
that would read back otherwise is left as it is). Integer-operator ONNX (QLinearConv) is not edited. Every
artifact that holds the tensor is mutated; a mutation that applies to none raises ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from mq_core.errors import ConfigError
from mq_core.export.exporter import ExportContext, ExportResult
from mq_core.export.manifest import MANIFEST
from mq_core.export.onnx_graph import Graph, QDQPair, make_node, save_model
from mq_core.export.ranges import PASSTHROUGH_OPS, QuantTable, in_graph_order
from mq_core.export.ranges_file import FLOAT_KIND, RangesFile, RangesFileExporter
from mq_core.io import atomic_write_bytes, atomic_write_text
from mq_core.plugins.lookup import get_backend, get_exporter

#: An export folder: a result of ``mq.export`` / ``ExportResult.load`` or its path.
Export = ExportResult | str | os.PathLike[str]
#: Edits one tensor of an ONNX artifact in place; True when the artifact holds the tensor.
OnnxEdit = Callable[[Graph, str], bool]
#: Returns the ranges table with one tensor's entry edited, or None when the table does not hold the tensor.
TableEdit = Callable[[QuantTable, str], QuantTable | None]

_FAKE_QUANTIZE = "FakeQuantize"


def update_checksums(out_dir: str | os.PathLike[str],
                     edit_manifest: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Make the manifest's checksums and sizes match the files as they are now (after ``edit_manifest``, if
    given, changed the manifest), so that ``ExportResult.load`` accepts the folder as untouched. Returns the
    manifest written."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if edit_manifest is not None:
        edit_manifest(manifest)
    for entry in manifest["files"]:
        data = (out / entry["path"]).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def copy_export(export: Export, out_dir: str | os.PathLike[str]) -> ExportResult:
    """A copy of an export folder at ``out_dir`` (to mutate), loaded back, with the prepared model of ``export``
    when it is an ``ExportResult`` that has one."""
    source = _folder(export)
    shutil.copytree(source, out_dir)
    copied = ExportResult.load(out_dir)
    return dataclasses.replace(copied, qmodel=export.qmodel) if isinstance(export, ExportResult) else copied


def _folder(export: Export) -> Path:
    return export.out_dir if isinstance(export, ExportResult) else Path(export)


# --- finding tensors ----------------------------------------------------------------------------------------------
def _activation_pairs(graph: Graph, tensor: str) -> list[QDQPair]:
    return [p for p in graph.qdq_pairs() if p.quantize is not None and p.input == tensor]


def _fake_quantizes(graph: Graph, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.model.graph.node if n.op_type == _FAKE_QUANTIZE and n.input[0] == tensor]


def _middle(names: list[str], what: str, folder: Path) -> str:
    unique = list(dict.fromkeys(names))
    if not unique:
        raise ConfigError(f"the export in {folder} has no {what} to mutate; pass the tensor by name, or mutate an "
                          "export that has one.")
    return unique[len(unique) // 2]


def _onnx_artifacts(result: ExportResult) -> list[Path]:
    """The ONNX artifacts that carry quantization (not a ranges-file exporter's float ONNX)."""
    return [a.path for a in result.artifacts if a.path.suffix == ".onnx" and a.kind != FLOAT_KIND]


def _default_tensor(result: ExportResult, pick: Callable[[Graph], list[str]],
                    table: Callable[[QuantTable], list[str]] | None, what: str) -> str:
    """The middle candidate in graph order of the first artifact that has any (ONNX first, then ranges files)."""
    for path in _onnx_artifacts(result):
        names = pick(Graph(onnx.load(path)))
        if names:
            return _middle(names, what, result.out_dir)
    exporter = get_exporter(result.exporter)
    if table is not None and isinstance(exporter, RangesFileExporter):
        float_model = onnx.load(result.path(FLOAT_KIND))
        for file in exporter.files:
            read = file.read(result.path(file.kind), _axes(result))
            names = table({e.name: e for e in in_graph_order(float_model, read)})
            if names:
                return _middle(names, what, result.out_dir)
    return _middle([], what, result.out_dir)


def _activations(graph: Graph) -> list[str]:
    outputs = set(graph.outputs)
    pairs = [p.input for p in graph.qdq_pairs() if p.quantize is not None and p.output not in outputs]
    return pairs + [n.input[0] for n in graph.model.graph.node
                    if n.op_type == _FAKE_QUANTIZE and n.output[0] not in outputs and n.input[0] not in
                    graph.initializers]


def _table_activations(table: QuantTable) -> list[str]:
    return [name for name, entry in table.items() if entry.kind == "activation"]


# --- applying an edit to every artifact ---------------------------------------------------------------------------
def _axes(result: ExportResult) -> dict[str, int]:
    return {name: e.axis for name, e in result.table.items() if e.axis is not None}


def _mutate(export: Export, tensor: str, what: str, onnx_edit: OnnxEdit | None, table_edit: TableEdit | None
            ) -> str:
    """Apply the edits to every artifact of the folder that holds ``tensor``, then re-seal the checksums."""
    result = ExportResult.load(_folder(export))  # refuses a folder that is already damaged
    mutated = []
    for path in _onnx_artifacts(result) if onnx_edit is not None else []:
        model = onnx.load(path)
        graph = Graph(model)
        if onnx_edit(graph, tensor):
            graph.remove_unused_initializers()
            save_model(model, path)
            mutated.append(path.name)
    exporter = get_exporter(result.exporter)
    if table_edit is not None and isinstance(exporter, RangesFileExporter):
        mutated += _rewrite_ranges(result, exporter, tensor, table_edit)
    if not mutated:
        raise ConfigError(f"no artifact of the {result.exporter} export in {result.out_dir} holds {what} "
                          f"{tensor!r} in a form this mutation edits (Q/DQ ONNX, FakeQuantize ONNX, or the ranges "
                          "files of a RangesFileExporter); pick another tensor or export.")
    update_checksums(result.out_dir)
    return tensor


def _rewrite_ranges(result: ExportResult, exporter: RangesFileExporter, tensor: str, edit: TableEdit) -> list[str]:
    """Each ranges file that lists ``tensor`` rewritten with its entry edited, through the exporter's reader and
    ``write_ranges``; a file that doing so without the edit would not reproduce, or whose format cannot hold the
    edit (it reads back otherwise), is left untouched."""
    float_model = onnx.load(result.path(FLOAT_KIND))
    options = exporter.parse_options(result.manifest.get("options", {}))
    axes = _axes(result)
    rewritten = []
    for file in exporter.files:
        path = result.path(file.kind)
        table = file.read(path, axes)
        edited = edit(dict(table), tensor)
        if edited is None:
            continue
        with tempfile.TemporaryDirectory() as stage:
            if _write_ranges(exporter, file, float_model, table, options, result, Path(stage)).read_bytes() != \
                    path.read_bytes():
                continue  # this exporter does not write the file it reads back: cannot edit just one entry
            staged = _write_ranges(exporter, file, float_model, edited, options, result, Path(stage))
            if not _same_table(file.read(staged, axes), edited):
                continue  # the format cannot state the edit (it reads back otherwise)
            atomic_write_bytes(path, staged.read_bytes())
        rewritten.append(path.name)
    return rewritten


def _write_ranges(exporter: RangesFileExporter, file: RangesFile, float_model: onnx.ModelProto, table: QuantTable,
                  options: Any, result: ExportResult, stage: Path) -> Path:
    """The file ``exporter`` writes for ``file`` from ``table`` into ``stage`` (as its ``export`` does, minus the
    checks)."""
    ctx = ExportContext(None, get_backend(result.backend), exporter.name, float_model, table, stage, options,
                        _float=(float_model, table))
    content = exporter.write_ranges(ctx, in_graph_order(float_model, table))[file.kind]
    save = ctx.save_text if isinstance(content, str) else ctx.save_json
    return save(f"{options.name}{file.suffix}", content, file.kind, "").path


def _same_table(read: QuantTable, expected: QuantTable) -> bool:
    if set(read) != set(expected):
        return False
    return all(np.array_equal(np.float32(read[n].scale), np.float32(expected[n].scale))
               and np.array_equal(read[n].zero_point, expected[n].zero_point) for n in read)


def _replace_entry(table: QuantTable, tensor: str, **changes: Any) -> QuantTable | None:
    if tensor not in table:
        return None
    table[tensor] = dataclasses.replace(table[tensor], **changes)
    return table


def _constant(graph: Graph, name: str, value: np.ndarray) -> str:
    """A new initializer ``name`` (made unique) holding ``value``; the original, maybe shared, stays."""
    unique, k = name, 1
    while unique in graph.initializers or unique in graph.producer:
        unique, k = f"{name}_{k}", k + 1
    graph.set_initializer(unique, value)
    return unique


# --- the mutations --------------------------------------------------------------------------------------------------
def scale_activation(export: Export, tensor: str | None = None, factor: float = 1.25) -> str:
    """Multiply one activation's scale by ``factor`` inside the artifacts: in its QuantizeLinear and
    DequantizeLinear (a new initializer, so another tensor sharing the original keeps it), in a FakeQuantize's four
    limits, or in a ranges file's entry. Default tensor: the middle quantized activation in graph order."""
    result = ExportResult.load(_folder(export))
    tensor = tensor or _default_tensor(result, _activations, _table_activations, "quantized activation")

    def onnx_edit(graph: Graph, name: str) -> bool:
        pairs, fake_quantizes = _activation_pairs(graph, name), _fake_quantizes(graph, name)
        for pair in pairs:
            scaled = _constant(graph, f"{name}_mutated_scale", graph.array(pair.scale) * np.float32(factor))
            pair.quantize.input[1] = pair.dequantize.input[1] = scaled
        for node in fake_quantizes:
            low, high = graph.array(node.input[1]) * np.float32(factor), graph.array(node.input[2]) * np.float32(factor)
            node.input[1:5] = [_constant(graph, f"{name}_mutated_low", low),
                               _constant(graph, f"{name}_mutated_high", high)] * 2
        return bool(pairs or fake_quantizes)

    def table_edit(table: QuantTable, name: str) -> QuantTable | None:
        entry = table.get(name)
        return None if entry is None else _replace_entry(
            table, name, scale=(entry.scale.astype(np.float64) * factor).astype(np.float32))

    return _mutate(export, tensor, "activation", onnx_edit, table_edit)


def shift_zero_point(export: Export, tensor: str | None = None, by: int = 1) -> str:
    """Shift one activation's zero point by ``by`` in its DequantizeLinear only (a new initializer; the
    QuantizeLinear keeps the original, so the two disagree as in a real exporter bug), or in a FakeQuantize's output
    limits (by ``by`` steps). Not in ranges files: one zero point there serves both sides, so they cannot disagree
    (shifting it moves only the clipping range, by one step). Default tensor: the middle quantized activation in
    graph order."""
    result = ExportResult.load(_folder(export))
    tensor = tensor or _default_tensor(result, _activations, None, "quantized activation")

    def onnx_edit(graph: Graph, name: str) -> bool:
        pairs, fake_quantizes = _activation_pairs(graph, name), _fake_quantizes(graph, name)
        for pair in pairs:
            if len(pair.dequantize.input) < 3:
                raise ConfigError(f"the DequantizeLinear of {name!r} has no zero point input to shift.")
            zero_point = graph.array(pair.zero_point)
            info = np.iinfo(zero_point.dtype)
            shifted = zero_point.astype(np.int64) + by
            if shifted.max() > info.max or shifted.min() < info.min:  # stay in the storage type: shift the other way
                shifted = zero_point.astype(np.int64) - by
            pair.dequantize.input[2] = _constant(graph, f"{name}_mutated_zero_point", shifted.astype(zero_point.dtype))
        for node in fake_quantizes:
            low, high = graph.array(node.input[3]), graph.array(node.input[4])
            levels = next(a.i for a in node.attribute if a.name == "levels")
            step = (high - low) / np.float32(levels - 1)
            node.input[3] = _constant(graph, f"{name}_mutated_output_low", (low - by * step).astype(np.float32))
            node.input[4] = _constant(graph, f"{name}_mutated_output_high", (high - by * step).astype(np.float32))
        return bool(pairs or fake_quantizes)

    return _mutate(export, tensor, "activation", onnx_edit, None)


def _copies(float_model: onnx.ModelProto, table: QuantTable, name: str) -> set[str]:
    """``name`` and the entries that carry its grid across pass-through ops (what
    ``propagate_through_passthrough`` copied, e.g. a conv output sharing its ReLU's encoding): dropping one of
    them alone changes nothing, the copy quantizes the same values on the same grid."""
    def same(a: str, b: str) -> bool:
        x, y = table[a], table[b]
        return not x.per_channel and not y.per_channel and bool(
            np.array_equal(x.scale, y.scale) and np.array_equal(x.zero_point, y.zero_point))

    links = [(n.input[0], n.output[0]) for n in float_model.graph.node
             if n.op_type in PASSTHROUGH_OPS and n.input and n.output]
    found, stack = {name}, [name]
    while stack:
        current = stack.pop()
        for a, b in links:
            other = b if a == current else a if b == current else None
            if other is not None and other not in found and other in table and same(current, other):
                found.add(other)
                stack.append(other)
    return found


def drop_qdq(export: Export, tensor: str | None = None) -> str:
    """Remove one activation's QuantizeLinear [-> Clip] -> DequantizeLinear (or its FakeQuantize), its readers
    rewired to the float tensor; in a ranges file, remove its entry and the copies of it across pass-through ops
    (``_copies``). Default tensor: the middle quantized activation in graph order (never a graph output)."""
    result = ExportResult.load(_folder(export))
    tensor = tensor or _default_tensor(result, _activations, _table_activations, "quantized activation")

    def onnx_edit(graph: Graph, name: str) -> bool:
        found = False
        for pair in _activation_pairs(graph, name):
            output = pair.output
            graph.remove_nodes(pair.nodes)
            graph.rewire(output, name)
            found = True
        for node in _fake_quantizes(graph, name):
            output = node.output[0]
            graph.remove_nodes([node])
            graph.rewire(output, name)
            found = True
        return found

    def table_edit(table: QuantTable, name: str) -> QuantTable | None:
        if name not in table:
            return None
        for copy in _copies(onnx.load(result.path(FLOAT_KIND)), table, name):
            del table[copy]
        return table

    return _mutate(export, tensor, "activation", onnx_edit, table_edit)


def per_tensor_weight(export: Export, weight: str | None = None) -> str:
    """Quantize one per-channel weight per tensor: its codes re-quantized, from the values they stand for, on one
    grid covering every channel's range, with one scale and zero point (its DequantizeLinear loses its axis).
    Default: the middle per-channel weight in graph order."""
    result = ExportResult.load(_folder(export))

    def per_channel(graph: Graph) -> list[str]:
        return [p.input for p in graph.qdq_pairs() if p.quantize is None and p.axis is not None
                and graph.array(p.scale).size > 1]

    weight = weight or _default_tensor(result, per_channel, None, "per-channel weight")
    table = result.table

    def onnx_edit(graph: Graph, name: str) -> bool:
        pairs = [p for p in graph.qdq_pairs() if p.quantize is None and p.input == name and p.axis is not None]
        for pair in pairs:
            codes = graph.array(name)
            scale, zero_point = graph.array(pair.scale).astype(np.float64), graph.array(pair.zero_point)
            info = np.iinfo(codes.dtype)
            qmin, qmax = (table[name].qmin, table[name].qmax) if name in table else (info.min, info.max)
            shape = [1] * codes.ndim
            shape[pair.axis] = -1
            values = (codes.astype(np.float64) - zero_point.reshape(shape)) * scale.reshape(shape)
            low = float(np.min((qmin - zero_point.astype(np.float64)) * scale))
            high = float(np.max((qmax - zero_point.astype(np.float64)) * scale))
            new_scale = np.float32((high - low) / (qmax - qmin))
            new_zero = int(np.clip(np.rint(qmin - low / new_scale), qmin, qmax))
            new_codes = np.clip(np.rint(values / new_scale) + new_zero, qmin, qmax).astype(codes.dtype)
            graph.set_initializer(name, new_codes)
            pair.dequantize.input[1] = _constant(graph, f"{name}_mutated_scale", np.array(new_scale, np.float32))
            pair.dequantize.input[2] = _constant(graph, f"{name}_mutated_zero_point",
                                                 np.array(new_zero, dtype=codes.dtype))
            kept = [a for a in pair.dequantize.attribute if a.name != "axis"]
            del pair.dequantize.attribute[:]
            pair.dequantize.attribute.extend(kept)
        return bool(pairs)

    return _mutate(export, weight, "per-channel weight", onnx_edit, None)


def round_half_away(export: Export, tensor: str | None = None) -> str:
    """Replace one activation's QuantizeLinear (per tensor) by a subgraph that rounds half away from zero:
    ``Cast(Clip(Sign(x / s) * Floor(|x / s| + 0.5) + z, lo, hi))`` with the storage type's limits, where
    QuantizeLinear rounds half to even; the two differ only at exact ties. Default tensor: the middle quantized
    activation in graph order."""
    result = ExportResult.load(_folder(export))
    tensor = tensor or _default_tensor(result, _activations, None, "quantized activation")

    def onnx_edit(graph: Graph, name: str) -> bool:
        pairs = _activation_pairs(graph, name)
        for pair in pairs:
            q = pair.quantize
            if graph.array(q.input[1]).size != 1:
                raise ConfigError(f"the QuantizeLinear of {name!r} is per channel; round_half_away rewrites "
                                  "per-tensor ones only.")
            zero_point = graph.array(q.input[2])
            info = np.iinfo(zero_point.dtype)
            p = f"{name}_mutated_round"
            half = _constant(graph, f"{p}_half", np.array(0.5, np.float32))
            lo = _constant(graph, f"{p}_lo", np.array(info.min, np.float32))
            hi = _constant(graph, f"{p}_hi", np.array(info.max, np.float32))
            to = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
            nodes = [
                make_node("Div", [q.input[0], q.input[1]], [f"{p}_div"], f"{p}_Div"),
                make_node("Abs", [f"{p}_div"], [f"{p}_abs"], f"{p}_Abs"),
                make_node("Add", [f"{p}_abs", half], [f"{p}_half_up"], f"{p}_AddHalf"),
                make_node("Floor", [f"{p}_half_up"], [f"{p}_floor"], f"{p}_Floor"),
                make_node("Sign", [f"{p}_div"], [f"{p}_sign"], f"{p}_Sign"),
                make_node("Mul", [f"{p}_sign", f"{p}_floor"], [f"{p}_rounded"], f"{p}_Mul"),
                make_node("Cast", [q.input[2]], [f"{p}_zero_point"], f"{p}_CastZeroPoint", to=onnx.TensorProto.FLOAT),
                make_node("Add", [f"{p}_rounded", f"{p}_zero_point"], [f"{p}_shifted"], f"{p}_AddZeroPoint"),
                make_node("Clip", [f"{p}_shifted", lo, hi], [f"{p}_clipped"], f"{p}_Clip"),
                make_node("Cast", [f"{p}_clipped"], [q.output[0]], f"{p}_Cast", to=to),
            ]
            graph.replace_nodes([q], nodes)
        return bool(pairs)

    return _mutate(export, tensor, "activation", onnx_edit, None)


def drop_clip(export: Export, tensor: str | None = None) -> str:
    """Remove the integer Clip between one activation's QuantizeLinear and DequantizeLinear (the grid of a
    sub-8-bit quantizer), so its codes span the whole storage type. Default tensor: the middle clipped
    activation in graph order."""
    result = ExportResult.load(_folder(export))

    def clipped(graph: Graph) -> list[str]:
        return [p.input for p in graph.qdq_pairs() if p.clip is not None and p.output not in graph.outputs]

    tensor = tensor or _default_tensor(result, clipped, None, "activation with an integer grid Clip")

    def onnx_edit(graph: Graph, name: str) -> bool:
        pairs = [p for p in _activation_pairs(graph, name) if p.clip is not None]
        for pair in pairs:
            output = pair.clip.output[0]
            graph.remove_nodes([pair.clip])
            graph.rewire(output, pair.quantize.output[0])
        return bool(pairs)

    return _mutate(export, tensor, "activation with an integer grid Clip", onnx_edit, None)
