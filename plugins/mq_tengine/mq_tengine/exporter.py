"""The ``tengine`` exporter: a float ONNX plus Tengine's activation scale table.

Artifacts (``name`` option ``model``):

* ``model.float.onnx`` (kind ``onnx-float``): Q/DQ removed, BN folded, weights dequantized; convert it with
  ``convert_tool -f onnx -m model.float.onnx -o model.tmfile``;
* ``model.scale_table.txt`` (kind ``scale-table``): ``name scale zero_point`` per activation tensor, in the
  graph's topological order; ``quant_tool_uint8 -m model.tmfile -s model.scale_table.txt`` quantizes with it.

Tengine's quant tool reads activation ranges only: it computes weight qparams itself with per-tensor uint8
min/max, so verification rebuilds the weights that way (``device_weights = UINT8_AFFINE``).
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
from typing import Any

import numpy as np
import onnx

from mq_core.plugin_api import (
    UINT8_AFFINE,
    ExportContext,
    Graph,
    QuantTable,
    RangesFile,
    RangesFileExporter,
    TensorQuant,
)
from mq_tengine.scale_table import format_scale_table, read_scale_table

log = logging.getLogger(__name__)

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


class TengineExporter(RangesFileExporter):
    name = "tengine"
    description = "Float ONNX + Tengine scale table (name scale zero_point) for quant_tool_uint8 -s."
    backends = ("tengine",)
    float_description = "Float ONNX (no Q/DQ, BN folded, dequantized weights) for Tengine's convert_tool."
    files = (RangesFile("scale-table", ".scale_table.txt", lambda path, _axes: read_scale_table(path),
                        "Tengine activation scale table: quant_tool_uint8 -s <file>."),)
    device_weights = UINT8_AFFINE
    uncovered = "have no scale; Tengine cannot run them in uint8"

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        warn_inplace_overrides(ctx.float_model()[0], {e.name: e for e in entries})
        return {"scale-table": format_scale_table(entries)}
