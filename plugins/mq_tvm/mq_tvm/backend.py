"""TVM's quantization rules as an mq Backend (MQBench's "ONNX_QNN" scheme).

uint8 asymmetric per-tensor weights and activations, total-integer placement (every layer's output quantized,
ReLU merged, adds quantized). The power-of-two variant of the MQBench paper's TVM setting is the ``w8a8-pot``
preset: ``mq.prepare(model, "tvm", qconfig="w8a8-pot")``.
"""

from mq_core import Backend, QConfig, QuantizerSpec, output_placement
from mq_core.plugin_api import UINT8_AFFINE

TVM = Backend(
    name="tvm",
    description="Apache TVM (relax): QDQ ONNX imported by tvm.relax.frontend.onnx; QOperator ONNX.",
    qconfig=QConfig(
        weight=QuantizerSpec(UINT8_AFFINE, observer="minmax"),
        activation=QuantizerSpec(UINT8_AFFINE, observer="ema_minmax"),
        name="tvm-default",
    ),
    placement=output_placement(network_inputs=True, network_outputs=True),
    exporters=("tvm", "tvm-qoperator"),
    runtimes=("tvm", "onnxruntime"),
    notes="tvm.relax.frontend.onnx.from_onnx(model) -> tvm.compile(mod, target='llvm').",
)
