"""Rewrite the canonical QDQ ONNX into OpenVINO's own form: ``org.openvinotoolkit`` FakeQuantize nodes.

OpenVINO's quantized IR is FakeQuantize-based; its ONNX frontend reads ``FakeQuantize`` from the
``org.openvinotoolkit`` domain directly, so this form reaches the low-precision transformations without the
QDQ-to-FakeQuantize conversion step. For an affine grid (scale ``s``, zero point ``z``, codes [qmin, qmax]):

    levels = qmax - qmin + 1
    input_low = output_low = (qmin - z) * s,  input_high = output_high = (qmax - z) * s

FakeQuantize then computes round((x - in_low) / (in_high - in_low) * (levels - 1)) / (levels - 1)
* (out_high - out_low) + out_low, the same grid as Q/DQ up to float rounding of ties (its arithmetic subtracts
``in_low`` and divides by the range where QuantizeLinear divides by ``s``).

A grid Clip in front of a QuantizeLinear (sub-8-bit grids) is absorbed: FakeQuantize clamps to its limits.
"""

from __future__ import annotations

import numpy as np
import onnx

from mq_core.plugin_api import ExportError, Graph, QDQPair, QuantTable, TensorQuant, make_node

DOMAIN = "org.openvinotoolkit"
WEIGHT_FORMS = ("dequantize", "fakequantize")


def limits(entry: TensorQuant, ndim: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """FakeQuantize (low, high) of a grid: scalars per tensor, shaped [C,1,...] (``ndim`` dims, C on the
    quantization axis) per channel."""
    low, high = entry.min.astype(np.float32), entry.max.astype(np.float32)
    if entry.axis is None:
        return low.reshape(()), high.reshape(())
    shape = [1] * ndim
    shape[entry.axis] = -1
    return low.reshape(shape), high.reshape(shape)


def _fake_quantize(graph: Graph, data: str, output: str, entry: TensorQuant, ndim: int) -> onnx.NodeProto:
    """A FakeQuantize node (and its limit initializers) quantizing tensor ``data`` into ``output``."""
    low, high = limits(entry, ndim)
    graph.set_initializer(f"{entry.name}_fq_low", low)
    graph.set_initializer(f"{entry.name}_fq_high", high)
    bounds = [f"{entry.name}_fq_low", f"{entry.name}_fq_high"]
    return make_node("FakeQuantize", [data, *bounds, *bounds], [output], f"{entry.name}_FakeQuantize",
                     domain=DOMAIN, levels=entry.qmax - entry.qmin + 1)


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    """Rank of an activation tensor from the (shape-inferred) canonical model, for per-channel limits."""
    for value in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if value.name == tensor and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    raise ExportError(f"the rank of per-channel quantized tensor {tensor!r} is unknown, so its FakeQuantize limits "
                      "cannot be shaped; quantize activations per tensor (OpenVINO's scheme) or use 'openvino-qdq'.")


def _weight(graph: Graph, pair: QDQPair, entry: TensorQuant) -> None:
    """Int codes + DequantizeLinear -> float constant (the dequantized codes) + FakeQuantize."""
    codes = graph.array(pair.input)
    float_name = f"{pair.input}_float"
    graph.set_initializer(float_name, entry.dequantize(codes))
    graph.replace_nodes([pair.dequantize], [_fake_quantize(graph, float_name, pair.output, entry, codes.ndim)])


def to_fake_quantize(model: onnx.ModelProto, table: QuantTable, weights: str = "dequantize") -> onnx.ModelProto:
    """A copy of the QDQ ``model`` with every activation [Clip ->] Q -> DQ replaced by one FakeQuantize.

    ``weights="dequantize"`` keeps weights as integer codes + DequantizeLinear; ``"fakequantize"`` stores them as
    float constants behind a per-channel FakeQuantize (limits shaped [C,1,1,1]).
    """
    if weights not in WEIGHT_FORMS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMS}, got {weights!r}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    for pair in graph.qdq_pairs():
        entry = table[pair.input]
        if pair.quantize is None:
            if weights == "fakequantize":
                _weight(graph, pair, entry)
            continue
        ndim = 0 if entry.axis is None else _rank(model, pair.input)
        graph.replace_nodes(pair.nodes, [_fake_quantize(graph, pair.input, pair.output, entry, ndim)])
    graph.remove_unused_initializers()
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model
