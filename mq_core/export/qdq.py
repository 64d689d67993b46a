"""The core's ``qdq`` exporter: the canonical QDQ ONNX as is (ONNX Runtime, and any runtime reading QDQ)."""

from __future__ import annotations

from mq_core.export.exporter import ExportContext, Exporter


class QDQExporter(Exporter):
    name = "qdq"
    description = "Canonical QDQ ONNX (QuantizeLinear/DequantizeLinear, int8 weight initializers), opset 18."
    backends = ("*",)

    def export(self, ctx: ExportContext) -> None:
        ctx.save_onnx(f"{ctx.options.name}.onnx", ctx.qdq_model, "onnx-qdq",
                      "QDQ ONNX: run with ONNX Runtime (U8 activations fuse into QLinearConv/QGemm), OpenVINO, TVM.")
