"""The TVM exporters: ``tvm`` (QDQ ONNX for relax, the default) and ``tvm-qoperator`` (QOperator ONNX).

``tvm``: TVM 0.27's relax importer reads the canonical QDQ ONNX as is (opset 18, 0-d scales, int8/uint8 weight
codes + DequantizeLinear, per-channel axes, grid Clips): checked on the zoo (ResNet, MobileNet, U-Net, MLP,
attention), so no TVM-specific variant is written. Relax simulates Q/DQ in float around float kernels.

``tvm-qoperator``: integer operators (see ``mq_tvm.qoperator``) that ONNX Runtime runs as integer kernels; TVM
imports it after ``mq_tvm.lowering.lower_qoperators`` (its importer has no QLinearConv/QLinearMatMul).
"""

from __future__ import annotations

import logging

from mq_core.plugin_api import ExportContext, Exporter, QDQExporter
from mq_tvm.qoperator import to_qoperator

log = logging.getLogger(__name__)


class TVMExporter(QDQExporter):
    name = "tvm"
    description = "QDQ ONNX imported by tvm.relax.frontend.onnx.from_onnx (TVM 0.27 reads the canonical form as is)."
    backends = ("tvm",)
    usage = "QDQ ONNX for TVM relax: from_onnx(model, shape_dict={...}) -> tvm.compile(target='llvm')."


class TVMQOperatorExporter(Exporter):
    name = "tvm-qoperator"
    description = ("QOperator ONNX: QLinearConv / QLinearMatMul (int32 bias), MatMulInteger for biased linear layers, "
                   "DQ -> op -> Q elsewhere; runs in ONNX Runtime and, lowered by mq_tvm, in TVM.")
    backends = ("tvm",)

    def export(self, ctx: ExportContext) -> None:
        model, counts = to_qoperator(ctx.qdq_model)
        log.info("tvm-qoperator: %s", ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "no integer ops")
        ctx.save_onnx(f"{ctx.options.name}.onnx", model, "onnx-qoperator",
                      "QOperator ONNX (uint8 codes, int32 biases): ONNX Runtime runs it directly; for TVM apply "
                      "mq_tvm.lowering.lower_qoperators before from_onnx.")
