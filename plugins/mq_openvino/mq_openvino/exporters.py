"""The OpenVINO exporters: ``openvino`` (FakeQuantize ONNX, the default) and ``openvino-qdq`` (plain QDQ ONNX).

Both read into ``ov.Core().read_model`` and compile to the same int8 kernels on the CPU plugin: OpenVINO's ONNX
frontend turns QuantizeLinear/DequantizeLinear pairs into FakeQuantize itself. The FakeQuantize form is what
OpenVINO's own tools (NNCF, the IR) use, and is the one to hand to ``ovc``/``benchmark_app``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mq_core.plugin_api import ExportContext, Exporter, QDQExporter, check_choice
from mq_openvino.fakequantize import WEIGHT_FORMS, to_fake_quantize


class OpenVINOExporter(Exporter):
    name = "openvino"
    description = ("ONNX with org.openvinotoolkit FakeQuantize nodes on activations, int8 weight codes + "
                   "DequantizeLinear; read by ov.Core().read_model / ovc.")
    backends = ("openvino",)

    @dataclass(frozen=True)
    class Options(Exporter.Options):
        """name: file name stem (``model`` -> ``model.onnx``).
        weights: ``"dequantize"`` keeps weights as int8 codes + DequantizeLinear (a quarter of the float size);
        ``"fakequantize"`` stores float weights behind a per-channel FakeQuantize (limits [C,1,1,1]), NNCF's
        layout. OpenVINO's CPU plugin folds both into the same int8 convolution/FullyConnected kernels.
        """

        weights: str = "dequantize"

        def __post_init__(self) -> None:
            check_choice("weights", self.weights, WEIGHT_FORMS)

    def export(self, ctx: ExportContext) -> None:
        model = to_fake_quantize(ctx.qdq_model, ctx.table, ctx.options.weights)
        ctx.save_onnx(f"{ctx.options.name}.onnx", model, "onnx-fakequantize",
                      "ONNX with org.openvinotoolkit FakeQuantize: ov.Core().read_model(<file>) or `ovc <file>`.")


class OpenVINOQDQExporter(QDQExporter):
    name = "openvino-qdq"
    description = "Plain QDQ ONNX; OpenVINO converts the Q/DQ pairs to FakeQuantize when it reads the model."
    backends = ("openvino",)
    usage = "QDQ ONNX for OpenVINO (read_model converts Q/DQ to FakeQuantize); also runs in ONNX Runtime."
