"""``RangesFileExporter``: the base of exporters that write a float ONNX plus side files of per-tensor ranges.

Toolchains such as SNPE/QNN (AIMET encodings), Tengine (scale table), TensorRT's implicit INT8 (dynamic ranges,
calibration cache) and fixed-point NPU compilers read no Q/DQ nodes: they quantize a float graph with ranges looked
up by tensor name. Such an exporter differs from the others only in its file format, so this base does the rest,
once, for all of them:

1. the float ONNX (``ctx.float_model()``: Q/DQ stripped, BN folded, weights dequantized), written as
   ``<name>.float.onnx`` (kind ``onnx-float``);
2. the table completed across grid-preserving ops (``propagate_through_passthrough``; targets that quantize every
   layer output need both sides of a max-pool or a merged ReLU), in graph order: activations and weights, or
   activations only when the toolchain quantizes weights itself (``device_weights``);
3. the subclass's ``write_ranges`` (its format; it refuses what the format cannot hold with ``ExportError`` and
   logs target-specific warnings), and a warning naming float tensors no file covers;
4. every file written through ``ctx.save_*`` and then **read back from disk** with its ``RangesFile.read``: a
   tensor missing from the file as written is an ``ExportError`` (the converter would silently re-calibrate it, or
   give it scale 0), not a file handed over;
5. ``runnables``: for verification, each file is parsed back once more and its ranges re-applied to the float ONNX
   as Q/DQ (``rebuild_qdq``), with the weights the device re-quantizes itself (``device_weights``), so a runtime
   checks the files as written rather than the exporter's memory.

A subclass sets ``files`` (each with its reader) and ``float_description``, and implements ``write_ranges``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx

from mq_core.errors import ExportError, VerificationError
from mq_core.export.exporter import ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.ranges import (
    QuantTable,
    TensorQuant,
    apply_table,
    in_graph_order,
    propagate_through_passthrough,
    uncovered_tensors,
    unknown_names,
    weights_as_device_quantizes,
)
from mq_core.quant.scheme import QuantScheme
from mq_core.text import shorten

#: The artifact kind of the float ONNX every ranges-file exporter writes.
FLOAT_KIND = "onnx-float"


@dataclass(frozen=True)
class RangesFile:
    """One side file of ranges: its artifact kind, the file name after the stem, its reader, and its manifest text.

    ``read(path, axes)`` parses the file back into a table (``axes`` gives per-channel tensors' channel axis, for
    formats that do not store it): the exporter checks the written file with it, and verification rebuilds Q/DQ
    from it. ``description`` is a ``str.format`` template filled with the exporter's options
    (``"AIMET encodings {format}"``), so write literal braces doubled.
    """

    kind: str
    suffix: str
    read: Callable[[Path, Mapping[str, int]], QuantTable]
    description: str


class RangesFileExporter(Exporter):
    """Float ONNX + side files of ranges, read back after writing and re-applied as Q/DQ for verification.

    Subclasses set ``files`` and ``float_description`` and implement ``write_ranges``; the class attributes below
    tune the shared steps (see the module docstring for the order they run in).
    """

    #: the side files, in the order they are written (after the float ONNX)
    files: ClassVar[tuple[RangesFile, ...]]
    #: manifest description of ``<name>.float.onnx``
    float_description: ClassVar[str]
    #: copy entries across grid-preserving ops before writing (targets that quantize every layer output)
    propagate: ClassVar[bool] = True
    #: the rule the toolchain quantizes weights with itself; when set, the files carry activation ranges only (None:
    #: they carry the weights' ranges too)
    device_weights: ClassVar[QuantScheme | None] = None
    #: the warning's text for float tensors no file covers ("have no scale; ..."); "" logs none
    uncovered: ClassVar[str] = ""

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        """Per file kind its content: ``str`` (written as text) or a JSON-ready value. ``entries``: what the files
        must hold, in graph order, keyed by the float ONNX's tensor names (``ctx.float_model()``)."""
        raise NotImplementedError

    def runnable_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Adjust a rebuilt Q/DQ model to what the device runs (default: as rebuilt)."""
        return model

    def export(self, ctx: ExportContext) -> None:
        log = logging.getLogger(type(self).__module__)  # warnings appear under the plugin's logger
        float_model, table = ctx.float_model()
        if self.propagate:
            table = propagate_through_passthrough(float_model, table)
        kinds = ("activation",) if self.device_weights is not None else ("activation", "weight")
        entries = [e for e in in_graph_order(float_model, table) if e.kind in kinds]
        contents = self.write_ranges(ctx, entries)
        uncovered = uncovered_tensors(float_model, table)
        if uncovered and self.uncovered:
            log.warning("%d float tensor(s) %s: %s", len(uncovered), self.uncovered, shorten(uncovered, 10))
        stem, options = ctx.options.name, dataclasses.asdict(ctx.options)
        ctx.save_onnx(f"{stem}.float.onnx", float_model, FLOAT_KIND, self.float_description)
        for file in self.files:
            content, save = contents[file.kind], ctx.save_text
            if not isinstance(content, str):
                save = ctx.save_json
            artifact = save(f"{stem}{file.suffix}", content, file.kind, file.description.format(**options))
            self._check_written(file, artifact.path, entries)
        log.info("wrote ranges of %d tensor(s) for %s: %s", len(entries), stem,
                 ", ".join(f"{stem}{f.suffix}" for f in self.files))

    def _check_written(self, file: RangesFile, path: Path, entries: list[TensorQuant]) -> None:
        """Read ``path`` back as the toolchain will and refuse a file that lacks any of ``entries``."""
        read = file.read(path, {e.name: e.axis for e in entries if e.axis is not None})
        missing = [e.name for e in entries if e.name not in read]
        if missing:
            raise ExportError(f"exporter {self.name!r} wrote a {file.kind} file ({path.name}) that, read back, lacks "
                              f"{len(missing)} quantized tensor(s): {shorten(missing)}; the converter would "
                              "re-calibrate them on its own. This is a bug in the exporter: report it to the package "
                              "that provides it.")

    def runnables(self, result: ExportResult) -> list[Runnable]:
        """Per file, the float ONNX with Q/DQ rebuilt from that file as written (plus the device's own weights)."""
        float_model = onnx.load(result.path(FLOAT_KIND))
        axes = {name: e.axis for name, e in result.table.items() if e.axis is not None}
        device: QuantTable = {}
        how = "as written"
        if self.device_weights is not None:
            weights = {n: e for n, e in result.table.items() if e.kind == "weight"}
            device = weights_as_device_quantizes(float_model, weights, self.device_weights)
            how = "as written and weights quantized by the device's own rule"
        runnables = []
        for file in self.files:
            table = {**device, **file.read(result.path(file.kind), axes)}
            rebuilt = rebuild_qdq(float_model, table, file.kind,
                                  f"float ONNX with Q/DQ from the {file.kind} file {how}")
            runnables.append(Runnable(file.kind, self.runnable_model(rebuilt.model), rebuilt.description))
        return runnables


def rebuild_qdq(float_model: onnx.ModelProto, table: QuantTable, artifact: str, description: str) -> Runnable:
    """A runnable QDQ model from the float ONNX and a table parsed back from the artifact's ranges file."""
    unknown = unknown_names(float_model, table)
    if unknown:
        raise VerificationError(
            f"the {artifact} file names {len(unknown)} tensor(s) the float ONNX does not have: {unknown[:8]}; "
            "the two files do not belong together (re-export both)."
        )
    return Runnable(artifact, apply_table(float_model, table), description)
