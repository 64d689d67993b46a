"""SNPE / QNN (Hexagon DSP/HTP) quantization rules as an mq Backend.

Classic Hexagon scheme: uint8 asymmetric per-tensor weights and activations; every layer's output quantized
("total integer"), ReLU/ReLU6 sharing their producer's encoding, network input and outputs included.
"""

from mq_core import Backend, QConfig, QuantizerSpec, output_placement
from mq_core.plugin_api import UINT8_AFFINE

SNPE = Backend(
    name="snpe",
    aliases=("qnn",),
    description="Qualcomm SNPE/QNN: float ONNX + AIMET encodings (0.6.1 for SNPE, 1.0.0 for QNN).",
    qconfig=QConfig(
        weight=QuantizerSpec(UINT8_AFFINE, observer="minmax"),
        activation=QuantizerSpec(UINT8_AFFINE, observer="ema_minmax"),
        name="snpe-default",
    ),
    placement=output_placement(network_inputs=True, network_outputs=True),
    exporters=("snpe", "qnn"),
    weight_bits=frozenset({4, 8}),
    runtimes=("onnxruntime",),
    notes="snpe-onnx-to-dlc --quantization_overrides encodings.json, then snpe-dlc-quantize --override_params.",
)
