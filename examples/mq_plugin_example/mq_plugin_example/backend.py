"""The ``pot-npu`` target's quantization rules, as a ``mq_core.Backend``.

The target is a fixed-point NPU in the style of Xilinx's DPU and many microcontroller NPUs: every tensor is int8
with a *power-of-two* scale, ``x = q * 2^-p``, where ``p`` is the tensor's "fix position". Requantizing between
layers is then a bit shift rather than an integer multiply, which is why such hardware insists on it.

A plugin author describes the hardware as data, and the core does the rest:

* ``qconfig``: the grids. Weights int8 symmetric per tensor with narrow range ``[-127, 127]`` (so ``-w`` is always
  representable, as sign-magnitude MAC arrays need) and activations int8 symmetric per tensor, both with
  ``pot_scale=True``: ``QuantScheme`` rounds every scale to the nearest power of two, once, in the core
  (``s = 2^round(log2 s)``). Observers are named, not imported: ``minmax`` for weights, an exponential moving
  average of min/max for activations.
* ``placement``: "total integer" (``output_placement``): the output of every layer is quantized, a ReLU merges
  into the layer before it, max-pool and reshapes keep their input's grid. Nothing between two layers is float.
* ``weight_bits`` / ``activation_bits``: the NPU runs 8 bits only; ``prepare`` refuses other presets with a
  message instead of exporting something the hardware cannot execute.
* ``exporters``: our own ``pot-npu`` first (the default), then the core's ``qdq`` for a quick ONNX Runtime check.
* ``runtimes``: ONNX Runtime runs the Q/DQ model rebuilt from the fix-position file, to verify it.
"""

from mq_core import Backend, QConfig, QuantizerSpec, QuantScheme, output_placement

#: int8 symmetric per tensor, narrow range [-127, 127], power-of-two scale.
POT_INT8_WEIGHT = QuantScheme(8, signed=True, symmetric=True, narrow_range=True, pot_scale=True)
#: int8 symmetric per tensor, full range [-128, 127], power-of-two scale.
POT_INT8_ACTIVATION = QuantScheme(8, signed=True, symmetric=True, pot_scale=True)

POT_NPU = Backend(
    name="pot-npu",
    aliases=("potnpu", "fixpoint-npu"),
    description="Fixed-point NPU (DPU style): int8 per-tensor weights and activations with power-of-two scales, "
    "float ONNX + fix-position JSON.",
    qconfig=QConfig(
        weight=QuantizerSpec(POT_INT8_WEIGHT, observer="minmax"),
        activation=QuantizerSpec(POT_INT8_ACTIVATION, observer="ema_minmax"),
        name="pot-npu-default",
    ),
    placement=output_placement(network_inputs=True, network_outputs=True),
    exporters=("pot-npu", "qdq"),
    weight_bits=frozenset({8}),
    activation_bits=frozenset({8}),
    runtimes=("onnxruntime",),
    notes="Compile model.float.onnx with the fix positions of model.fixpos.json (scale = 2^-fix_pos).",
)
