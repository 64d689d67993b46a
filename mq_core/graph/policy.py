"""PlacementPolicy: a backend's answer to "which tensors are quantized?", as data.

The policy only names op kinds (see ``mq_core.graph.ops``); one core pass (``mq_core.graph.placement``) reads it,
marks the graph, and materialises exactly one fake quantizer per quantized tensor. Two families cover the targets:

* *input placement* (TensorRT, OpenVINO): quantize the tensor inputs of the listed compute ops;
* *output placement* ("total integer": SNPE, TVM, Tengine, ONNX Runtime): quantize the output of every compute op,
  merging a directly following ReLU/ReLU6 into its producer and passing the grid through layout and max-pool ops.
  A runtime that executes some op kinds in float only (ONNX Runtime: LayerNorm, GELU) names them in
  ``float_kinds``; placement then quantizes a tensor only for the readers that consume it in integer.

Weights: the QAT swap gives a weight fake quantizer to each layer whose op kind is in ``weight_kinds``. Conv and
Linear weights are quantized everywhere; an embedding table only where the runtime reads it quantized (ONNX Runtime
dequantizes the int8 table and gathers from it: ``qdq``); elsewhere it stays float.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Ops whose output lies on the grid of their input: never re-quantized, quantizers are not duplicated there.
PASSTHROUGH_KINDS = frozenset({"maxpool", "reshape", "getitem", "identity"})
#: Activations that share their producer's quantizer ("activation merging").
MERGE_KINDS = frozenset({"relu", "relu6"})
#: Op kinds whose integer kernels read quantized inputs whatever their output (ONNX Runtime's MatMulIntegerToFloat and
#: QGemm give a float output; a Conv reads its dequantized input either way).
INTEGER_INPUT_KINDS = frozenset({"conv", "conv_transpose", "linear", "matmul"})
#: Every op kind that computes new values (output placement quantizes their outputs).
COMPUTE_KINDS = frozenset({
    "conv", "conv_transpose", "linear", "matmul", "add", "sub", "mul", "div", "scalar_arith", "cat",
    "avgpool", "mean", "interpolate", "softmax", "activation", "gelu", "relu", "relu6", "norm", "embedding", "other",
})
#: Op kinds whose layers get a weight quantizer by default: Conv/Linear, and "other" (a layer type a plugin registers
#: a QAT module for). Not "embedding": most runtimes gather from a float table (a backend opts in).
WEIGHT_KINDS = frozenset({"conv", "conv_transpose", "linear", "other"})


@dataclass(frozen=True)
class PlacementPolicy:
    """Where activation quantizers go.

    Attributes:
        quantize_inputs_of: op kinds whose tensor inputs are quantized (input placement).
        quantize_outputs_of: op kinds whose outputs are quantized (output placement).
        merge_into_producer: activation kinds that share their producer's quantizer under output placement.
        passthrough: op kinds whose output inherits the grid of their input.
        network_inputs: quantize the model's inputs (for all consumers).
        network_outputs: keep quantizers on tensors that are model outputs (output placement).
        unsigned_non_negative: make the activation grid unsigned where the tensor is non-negative by
            construction (after ReLU-like ops, through pooling/layout), as OpenVINO does.
        eltwise_before_norm: under input placement, quantize the inputs of an add/sub/mul/div whose result a norm
            (LayerNorm, GroupNorm) reads. OpenVINO: off; its low-precision transformations move the dequantization
            scale of such a sum through the norm without scaling the norm's epsilon, so the deployed LayerNorm
            differs from the simulated one (by a step in 30% of the elements with GPT-2's epsilon of 1e-5).
        float_kinds: under output placement, op kinds the runtime has no integer kernel for: they read their inputs
            in float, and their outputs are quantized only for readers that consume them in integer. A reader
            consumes its input in integer when it is a Linear/MatMul/Conv (``INTEGER_INPUT_KINDS``), or any other
            op whose own output is quantized (an integer Add needs a quantized output, as QLinearAdd does); an op
            whose result only float ops read runs in float; a float op's network output stays float. Empty (the
            default): every compute op's output is quantized for all its readers.
        weight_kinds: op kinds whose layers the QAT swap gives a weight fake quantizer (a layer of another kind
            keeps a float weight even when a QAT type is registered for it). Add "embedding" where the runtime
            reads a quantized embedding table (``WEIGHT_KINDS`` does not).
    """

    quantize_inputs_of: frozenset[str] = frozenset()
    quantize_outputs_of: frozenset[str] = frozenset()
    merge_into_producer: frozenset[str] = MERGE_KINDS
    passthrough: frozenset[str] = PASSTHROUGH_KINDS
    network_inputs: bool = True
    network_outputs: bool = True
    unsigned_non_negative: bool = False
    eltwise_before_norm: bool = True
    float_kinds: frozenset[str] = frozenset()
    weight_kinds: frozenset[str] = WEIGHT_KINDS

    @property
    def style(self) -> str:
        return "outputs" if self.quantize_outputs_of else "inputs"

    def describe(self) -> str:
        if self.quantize_outputs_of:
            text = "outputs of every layer (ReLU merged, layout/max-pool pass through)"
            if self.float_kinds:
                text += "; " + ", ".join(sorted(self.float_kinds)) + " in float, quantized only for integer readers"
        else:
            text = "inputs of " + ", ".join(sorted(self.quantize_inputs_of))
        if self.weight_kinds != WEIGHT_KINDS:
            text += "; weights of " + ", ".join(sorted(self.weight_kinds - {"other"}))
        text += f"; network inputs {'on' if self.network_inputs else 'off'}"
        return text + f", outputs {'on' if self.network_outputs else 'off'}"


def input_placement(*kinds: str, network_inputs: bool = True, unsigned_non_negative: bool = False,
                    eltwise_before_norm: bool = True) -> PlacementPolicy:
    """Quantize the inputs of the given op kinds (outputs stay float)."""
    return PlacementPolicy(quantize_inputs_of=frozenset(kinds), network_inputs=network_inputs,
                           network_outputs=False, unsigned_non_negative=unsigned_non_negative,
                           eltwise_before_norm=eltwise_before_norm)


def output_placement(network_inputs: bool = True, network_outputs: bool = True,
                     compute: frozenset[str] = COMPUTE_KINDS, float_kinds: frozenset[str] = frozenset(),
                     weight_kinds: frozenset[str] = WEIGHT_KINDS) -> PlacementPolicy:
    """Quantize the output of every compute op ("total integer"), but for the ``float_kinds`` the runtime keeps in
    float (see ``PlacementPolicy.float_kinds``); weights of the ``weight_kinds``."""
    return PlacementPolicy(quantize_outputs_of=compute, network_inputs=network_inputs,
                           network_outputs=network_outputs, float_kinds=float_kinds, weight_kinds=weight_kinds)
