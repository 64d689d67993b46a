"""Tengine's quantization rules (``Tengine_u8``) as an mq Backend.

uint8 asymmetric per-tensor weights and activations, scale = (max - min) / 255, z = round(-min / scale);
total-integer placement including concat, hardswish, sigmoid and every graph output.
"""

from mq_core import Backend, QConfig, QuantizerSpec, output_placement
from mq_core.plugin_api import UINT8_AFFINE

TENGINE = Backend(
    name="tengine",
    description="OPEN AI LAB Tengine: float ONNX + scale table (name scale zero_point), Conv+ReLU fused.",
    qconfig=QConfig(
        weight=QuantizerSpec(UINT8_AFFINE, observer="minmax"),
        activation=QuantizerSpec(UINT8_AFFINE, observer="ema_minmax"),
        name="tengine-default",
    ),
    placement=output_placement(network_inputs=True, network_outputs=True),
    exporters=("tengine",),
    runtimes=("onnxruntime",),
    notes="convert_tool -f onnx -m model.onnx -o model.tmfile; quant_tool_uint8 with -s scale_table.txt.",
)
