"""The core's ``qdq`` exporter: the canonical QDQ ONNX as is (ONNX Runtime, and any runtime reading QDQ).

Backends whose artifact *is* the canonical QDQ ONNX (TVM, OpenVINO's QDQ form, TensorRT after its lint) subclass
it and only change the name, the backends served and the instructions written into the manifest.
"""

from __future__ import annotations

from typing import ClassVar

from mq_core.export.exporter import ExportContext, Exporter


class QDQExporter(Exporter):
    name = "qdq"
    description = "Canonical QDQ ONNX (QuantizeLinear/DequantizeLinear, int8 weight initializers), opset 18."
    backends = ("*",)
    #: How to run the file, recorded with the artifact in the manifest.
    usage: ClassVar[str] = ("QDQ ONNX: run with ONNX Runtime (U8 activations fuse into QLinearConv/QGemm), "
                            "OpenVINO, TVM.")

    def export(self, ctx: ExportContext) -> None:
        ctx.save_onnx(f"{ctx.options.name}.onnx", ctx.qdq_model, "onnx-qdq", self.usage)
