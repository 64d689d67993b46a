"""TensorRT's quantization rules as an mq Backend.

Explicit quantization (the only INT8 route in TensorRT 11): Q/DQ on the inputs of Conv, ConvTranspose, Gemm and
MatMul (data and weight) and on both inputs of residual adds, so the add fuses into the preceding conv in INT8.
Weights int8 symmetric per output channel with narrow range [-127, 127]; activations int8 symmetric per tensor.
"""

from mq_core import Backend, QConfig, QuantizerSpec, input_placement
from mq_core.plugin_api import INT8_SYM, INT8_SYM_PER_CHANNEL_NARROW

#: Op kinds TensorRT wants Q/DQ in front of.
TRT_QUANTIZED_INPUTS = ("conv", "conv_transpose", "linear", "matmul", "add")

TENSORRT = Backend(
    name="tensorrt",
    aliases=("trt",),
    description="NVIDIA TensorRT: explicit Q/DQ ONNX (TensorRT 10/11), legacy dynamic ranges and calibration cache.",
    qconfig=QConfig(
        weight=QuantizerSpec(INT8_SYM_PER_CHANNEL_NARROW, observer="minmax"),
        activation=QuantizerSpec(INT8_SYM, observer="ema_minmax"),
        name="tensorrt-default",
    ),
    placement=input_placement(*TRT_QUANTIZED_INPUTS, network_inputs=False),
    exporters=("tensorrt", "tensorrt-legacy"),
    runtimes=("onnxruntime",),
    notes="Build with `trtexec --onnx=model.onnx --stronglyTyped` (explicit Q/DQ); TensorRT <= 10 legacy: "
    "`trtexec --onnx=model.float.onnx --int8 --calib=model.calibration.cache`.",
)
