"""The ``tengine`` exporter: a float ONNX plus Tengine's activation scale table.

Artifacts (``name`` option ``model``):

* ``model.float.onnx`` (kind ``onnx-float``): Q/DQ removed, BN folded, weights dequantized; convert it with
  ``convert_tool -f onnx -m model.float.onnx -o model.tmfile``;
* ``model.scale_table.txt`` (kind ``scale-table``): ``name scale zero_point`` per activation tensor, in the
  graph's topological order; ``quant_tool_uint8 -m model.tmfile -s model.scale_table.txt`` quantizes with it.

Tengine's quant tool reads activation ranges only: it computes weight qparams itself with per-tensor uint8
min/max, so verification rebuilds the weights that way (``weights_as_device_quantizes`` with ``UINT8_AFFINE``).
Its exact rule (``quant_save_graph.cpp``) truncates the weight zero point, ``int(-min / scale)``, where mq rounds;
the two differ only for the lowest weight codes, by at most one weight step.

Propagation: every tensor Tengine quantizes must be in the table (a missing one gets scale 0). Tengine fuses
Conv+ReLU/ReLU6 and, in its default in-place mode, copies an output's scale to the single-use input of Flatten,
Reshape, Squeeze, Clip, Slice, max-pool and ReLU; the exporter writes those copies itself (the conv output gets the
ReLU output's scale and zero point), and also copies scales across the other grid-preserving ops of
``PASSTHROUGH_OPS`` (Transpose, Unsqueeze, Gather ...), whose outputs Tengine would otherwise leave unscaled.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from mq_core.errors import ExportError
from mq_core.export.exporter import ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.onnx_graph import Graph
from mq_core.export.quant_table import QuantTable, TensorQuant, weights_as_device_quantizes
from mq_core.export.ranges import in_graph_order, propagate_through_passthrough, rebuild_qdq, uncovered_tensors
from mq_core.quant.scheme import UINT8_AFFINE
from mq_tengine.scale_table import format_scale_table, read_scale_table

log = logging.getLogger(__name__)

FLOAT_KIND = "onnx-float"
TABLE_KIND = "scale-table"

#: Ops across which Tengine's quant tool (in-place mode) copies an output's scale onto a single-use input.
TENGINE_INPLACE_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Clip", "Slice", "MaxPool", "Relu"})


def _same_grid(a: TensorQuant, b: TensorQuant) -> bool:
    return bool(np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point))


def warn_inplace_overrides(model: onnx.ModelProto, table: QuantTable) -> list[str]:
    """Inputs whose scale Tengine will overwrite with its pass-through op's output scale (logged as warnings).

    This happens only when the prepared model quantized both sides of such an op with different qparams; the
    deployed model then differs from the simulation around that tensor.
    """
    graph = Graph(model)
    overridden = []
    for node in model.graph.node:
        if node.op_type not in TENGINE_INPLACE_OPS or not node.input:
            continue
        source, out = node.input[0], node.output[0]
        if (source in table and out in table and len(graph.consumers.get(source, [])) == 1
                and not _same_grid(table[source], table[out])):
            overridden.append(source)
    if overridden:
        log.warning("Tengine's quant tool will give %s the scale of the following %s output(s) (its in-place "
                    "pass), which differs from the simulation; quantize only one side of those ops.",
                    ", ".join(overridden), "/".join(sorted(TENGINE_INPLACE_OPS)))
    return overridden


class TengineExporter(Exporter):
    name = "tengine"
    description = "Float ONNX + Tengine scale table (name scale zero_point) for quant_tool_uint8 -s."
    backends = ("tengine",)

    def export(self, ctx: ExportContext) -> None:
        float_model, table = ctx.float_model()
        table = propagate_through_passthrough(float_model, table)
        activations = [e for e in in_graph_order(float_model, table) if e.kind == "activation"]
        text = format_scale_table(activations)
        written = {line.split()[0] for line in text.splitlines()}
        missing = sorted({n for n, e in table.items() if e.kind == "activation"} - written)
        if missing:
            raise ExportError(f"activation tensors missing from the scale table: {missing[:8]} (this is a bug in "
                              "mq's export: please report it).")
        warn_inplace_overrides(float_model, table)
        uncovered = uncovered_tensors(float_model, table)
        if uncovered:
            log.warning("%d float tensor(s) have no scale; Tengine cannot run them in uint8: %s", len(uncovered),
                        ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else ""))
        stem = ctx.options.name
        ctx.save_onnx(f"{stem}.float.onnx", float_model, FLOAT_KIND,
                      "Float ONNX (no Q/DQ, BN folded, dequantized weights) for Tengine's convert_tool.")
        ctx.save_text(f"{stem}.scale_table.txt", text, TABLE_KIND,
                      "Tengine activation scale table: quant_tool_uint8 -s <file>.")
        log.info("wrote %d scale table lines for %s", len(activations), stem)

    def runnables(self, result: ExportResult) -> list[Runnable]:
        float_model = onnx.load(result.path(FLOAT_KIND))
        weights = {n: e for n, e in result.table.items() if e.kind == "weight"}
        table = {**read_scale_table(result.path(TABLE_KIND)),
                 **weights_as_device_quantizes(float_model, weights, UINT8_AFFINE)}
        return [rebuild_qdq(float_model, table, TABLE_KIND, "float ONNX with Q/DQ from the scale table as written "
                            "and weights quantized by Tengine's uint8 min/max rule")]
