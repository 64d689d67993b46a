"""PlacementPolicy: a backend's answer to "which tensors are quantized?", as data.

The policy only names op kinds (see ``mq_core.graph.ops``); one core pass (``mq_core.graph.placement``) reads it,
marks the graph, and materialises exactly one fake quantizer per quantized tensor. Two families cover the targets:

* *input placement* (TensorRT, OpenVINO): quantize the tensor inputs of the listed compute ops;
* *output placement* ("total integer": SNPE, TVM, Tengine, ONNX Runtime): quantize the output of every compute op,
  merging a directly following ReLU/ReLU6 into its producer and passing the grid through layout and max-pool ops.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Ops whose output lies on the grid of their input: never re-quantized, quantizers are not duplicated there.
PASSTHROUGH_KINDS = frozenset({"maxpool", "reshape", "getitem", "identity"})
#: Activations that share their producer's quantizer ("activation merging").
MERGE_KINDS = frozenset({"relu", "relu6"})
#: Every op kind that computes new values (output placement quantizes their outputs).
COMPUTE_KINDS = frozenset({
    "conv", "conv_transpose", "linear", "matmul", "add", "sub", "mul", "div", "scalar_arith", "cat",
    "avgpool", "mean", "interpolate", "softmax", "activation", "relu", "relu6", "norm", "other",
})


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
    """

    quantize_inputs_of: frozenset[str] = frozenset()
    quantize_outputs_of: frozenset[str] = frozenset()
    merge_into_producer: frozenset[str] = MERGE_KINDS
    passthrough: frozenset[str] = PASSTHROUGH_KINDS
    network_inputs: bool = True
    network_outputs: bool = True
    unsigned_non_negative: bool = False
    eltwise_before_norm: bool = True

    @property
    def style(self) -> str:
        return "outputs" if self.quantize_outputs_of else "inputs"

    def describe(self) -> str:
        if self.quantize_outputs_of:
            text = "outputs of every layer (ReLU merged, layout/max-pool pass through)"
        else:
            text = "inputs of " + ", ".join(sorted(self.quantize_inputs_of))
        text += f"; network inputs {'on' if self.network_inputs else 'off'}"
        return text + f", outputs {'on' if self.network_outputs else 'off'}"


def input_placement(*kinds: str, network_inputs: bool = True, unsigned_non_negative: bool = False,
                    eltwise_before_norm: bool = True) -> PlacementPolicy:
    """Quantize the inputs of the given op kinds (outputs stay float)."""
    return PlacementPolicy(quantize_inputs_of=frozenset(kinds), network_inputs=network_inputs,
                           network_outputs=False, unsigned_non_negative=unsigned_non_negative,
                           eltwise_before_norm=eltwise_before_norm)


def output_placement(network_inputs: bool = True, network_outputs: bool = True,
                     compute: frozenset[str] = COMPUTE_KINDS) -> PlacementPolicy:
    """Quantize the output of every compute op ("total integer")."""
    return PlacementPolicy(quantize_outputs_of=compute, network_inputs=network_inputs,
                           network_outputs=network_outputs)
