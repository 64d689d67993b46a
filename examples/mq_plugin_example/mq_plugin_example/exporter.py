"""The ``pot-npu`` exporter: the float ONNX the NPU compiler reads, plus its fix-position file.

Artifacts (``name`` option, default ``model``):

* ``model.float.onnx`` (kind ``onnx-float``): Q/DQ removed, BatchNorm folded, weights holding their dequantized
  values (which quantize back to exactly the simulated codes);
* ``model.fixpos.json`` (kind ``fixpos``): the fix position of every quantized tensor, activations and weights
  (format in ``mq_plugin_example.fixpos``).

What an exporter author does, and why:

1. Start from what the core hands over (``ExportContext``): the canonical QDQ ONNX and its ranges table, whose
   scales are the simulation's. ``ctx.float_model()`` strips the Q/DQ and re-keys the table by the float graph's
   tensor names; no exporter re-implements that.
2. Complete the table for the target. A compiler quantizing a float graph needs a fix position for *every* tensor
   it runs in integer, including both sides of ops that keep the grid (max-pool, flatten, a ReLU merged into its
   conv). ``propagate_through_passthrough`` copies entries across those ops, exactly: re-quantizing a tensor that
   is already on a grid changes nothing.
3. Convert to the target's format and refuse what it cannot hold, loudly (``ExportError``), rather than write a
   file the compiler would silently round.
4. Write through ``ctx.save_*``: files land in a staging folder and appear only if the whole export succeeds,
   with checksums in the manifest.
5. ``runnables``: say how to run the artifacts for ``mq.verify``. Here the fix-position file is parsed back from
   disk and Q/DQ are put into the float ONNX from it (``rebuild_qdq``): the runtime checks the file as written.
"""

from __future__ import annotations

import logging

import onnx

from mq_core.export.exporter import ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.ranges import in_graph_order, propagate_through_passthrough, rebuild_qdq, uncovered_tensors
from mq_plugin_example.fixpos import format_fixpos, read_fixpos

log = logging.getLogger(__name__)

FLOAT_KIND = "onnx-float"
FIXPOS_KIND = "fixpos"


class PotNpuExporter(Exporter):
    name = "pot-npu"
    description = "Float ONNX + fix-position JSON (scale = 2^-fix_pos) for a fixed-point NPU compiler."
    backends = ("pot-npu",)

    def export(self, ctx: ExportContext) -> None:
        float_model, table = ctx.float_model()
        table = propagate_through_passthrough(float_model, table)
        data = format_fixpos(in_graph_order(float_model, table))  # ExportError on anything not power-of-two
        uncovered = uncovered_tensors(float_model, table)
        if uncovered:
            log.warning("%d float tensor(s) have no fix position; the NPU compiler will run them in float or "
                        "refuse them: %s", len(uncovered), ", ".join(uncovered[:10]))
        stem = ctx.options.name
        ctx.save_onnx(f"{stem}.float.onnx", float_model, FLOAT_KIND,
                      "Float ONNX (no Q/DQ, BN folded, dequantized weights) for the NPU compiler.")
        ctx.save_json(f"{stem}.fixpos.json", data, FIXPOS_KIND,
                      "Fix position (scale = 2^-fix_pos) of every quantized activation and weight.")
        log.info("wrote fix positions of %d tensors for %s", len(data["tensors"]), stem)

    def runnables(self, result: ExportResult) -> list[Runnable]:
        float_model = onnx.load(result.path(FLOAT_KIND))
        table = read_fixpos(result.path(FIXPOS_KIND))
        return [rebuild_qdq(float_model, table, FIXPOS_KIND,
                            "float ONNX with Q/DQ rebuilt from the fix-position file as written")]
