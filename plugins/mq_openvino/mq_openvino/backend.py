"""OpenVINO's (NNCF-style) quantization rules as an mq Backend.

Weights int8 symmetric per output channel (narrow, 255 levels); activations per-tensor symmetric, unsigned where
the producer is ReLU-like and signed otherwise. Quantizers on the network input and on the inputs of
Conv/MatMul/Linear and eltwise ops; the last layer's output stays float. Weights may also have 7 bits (the
``reduce-range`` preset): NNCF's "overflow fix" for x86 CPUs without VNNI, whose int8 kernels saturate int16
sums of u8 x s8 products with full 8-bit weights (see ``mq_openvino.runtime``).
"""

from mq_core import Backend, QConfig, QuantizerSpec, input_placement
from mq_core.plugin_api import INT8_SYM, INT8_SYM_PER_CHANNEL_NARROW

OV_QUANTIZED_INPUTS = ("conv", "conv_transpose", "linear", "matmul", "add", "sub", "mul", "div")

OPENVINO = Backend(
    name="openvino",
    aliases=("ov",),
    description="Intel OpenVINO: ONNX with org.openvinotoolkit FakeQuantize, or plain QDQ ONNX.",
    qconfig=QConfig(
        weight=QuantizerSpec(INT8_SYM_PER_CHANNEL_NARROW, observer="minmax"),
        activation=QuantizerSpec(INT8_SYM, observer="ema_minmax"),
        name="openvino-default",
    ),
    placement=input_placement(*OV_QUANTIZED_INPUTS, network_inputs=True, unsigned_non_negative=True,
                              eltwise_before_norm=False),
    exporters=("openvino", "openvino-qdq"),
    weight_bits=frozenset({4, 7, 8}),
    runtimes=("openvino", "onnxruntime"),
    notes="ov.Core().read_model('model.onnx') -> compile_model(..., 'CPU'); or `ovc model.onnx` for IR.",
)
