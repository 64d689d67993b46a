"""The ``pot-npu`` exporter: the float ONNX the NPU compiler reads, plus its fix-position file.

Artifacts (``name`` option, default ``model``):

* ``model.float.onnx`` (kind ``onnx-float``): Q/DQ removed, BatchNorm folded, weights holding their dequantized
  values (which quantize back to exactly the simulated codes);
* ``model.fixpos.json`` (kind ``fixpos``): the fix position of every quantized tensor, activations and weights
  (format in ``mq_plugin_example.fixpos``).

What an exporter author does, and why. The target reads a float graph plus a side file of ranges, so the exporter
derives from ``RangesFileExporter``, which does every step but the file format:

1. Start from what the core hands over: the canonical QDQ ONNX and its ranges table, whose scales are the
   simulation's. The base strips the Q/DQ (``ctx.float_model()``), re-keys the table by the float graph's tensor
   names and writes ``model.float.onnx``; no exporter re-implements that.
2. Complete the table for the target. A compiler quantizing a float graph needs a fix position for *every* tensor
   it runs in integer, including both sides of ops that keep the grid (max-pool, flatten, a ReLU merged into its
   conv). The base copies entries across those ops (``propagate_through_passthrough``), exactly: re-quantizing a
   tensor that is already on a grid changes nothing.
3. **Yours:** convert to the target's format (``write_ranges``) and refuse what it cannot hold, loudly
   (``ExportError``), rather than write a file the compiler would silently round; and name the reader that parses
   it back (``RangesFile``'s ``read``, here ``read_fixpos``).
4. The base writes through ``ctx.save_*`` (files land in a staging folder and appear only if the whole export
   succeeds, with checksums in the manifest), then reads the file back with that reader and refuses one that lacks
   a quantized tensor.
5. ``runnables`` (from the base): for ``mq.verify``, the fix-position file is parsed back from disk and Q/DQ are
   put into the float ONNX from it (``rebuild_qdq``): the runtime checks the file as written.
"""

from __future__ import annotations

from typing import Any

from mq_core.plugin_api import ExportContext, RangesFile, RangesFileExporter, TensorQuant
from mq_plugin_example.fixpos import format_fixpos, read_fixpos


class PotNpuExporter(RangesFileExporter):
    name = "pot-npu"
    description = "Float ONNX + fix-position JSON (scale = 2^-fix_pos) for a fixed-point NPU compiler."
    backends = ("pot-npu",)
    float_description = "Float ONNX (no Q/DQ, BN folded, dequantized weights) for the NPU compiler."
    files = (RangesFile("fixpos", ".fixpos.json", lambda path, _axes: read_fixpos(path),
                        "Fix position (scale = 2^-fix_pos) of every quantized activation and weight."),)
    uncovered = "have no fix position; the NPU compiler will run them in float or refuse them"

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        return {"fixpos": format_fixpos(entries)}  # ExportError on anything not power-of-two
