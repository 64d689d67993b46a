"""Lower QLinearConv / QLinearMatMul to ONNX ops that TVM's relax importer has.

TVM 0.27's ``tvm.relax.frontend.onnx`` imports QuantizeLinear, DequantizeLinear and MatMulInteger but has no
QLinearConv or QLinearMatMul converter (``from_onnx`` raises "unsupported ops"). This rewrite keeps the integer
semantics of the two operators, as ONNX Runtime's CPU kernels compute them:

    acc = sum((x - zx) * (w - zw)) + B                                  exact integer
    y   = saturate(round_half_even(float32(acc) * float32(float32(sx * sw) / sy)) + zy)

* QLinearConv -> Cast/Sub to float64, Conv in float64 (integer-valued; exact for any realistic layer, |acc| < 2^53),
  Cast to float32, Mul by the requantization multiplier, QuantizeLinear(scale 1, zy) for round-and-saturate;
* QLinearMatMul -> MatMulInteger (int32, imported as an integer matmul), Cast, Mul, QuantizeLinear(scale 1, zy).

Use ``lower_qoperators(model)`` before ``from_onnx`` when deploying a QOperator ONNX with TVM; the ``tvm`` runtime
does it for every model it runs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from mq_core.plugin_api import Graph, make_node

LOWERED = ("QLinearConv", "QLinearMatMul")


def requant_multiplier(a_scale: np.ndarray, b_scale: np.ndarray, y_scale: np.ndarray) -> np.ndarray:
    """float32(float32(a_scale * b_scale) / y_scale), in ONNX Runtime's order of float32 operations."""
    product = np.float32(a_scale).astype(np.float32) * np.asarray(b_scale, dtype=np.float32)
    return (product / np.float32(y_scale)).astype(np.float32)


def _requantize(graph: Graph, node: onnx.NodeProto, acc: str, multiplier: np.ndarray) -> list[onnx.NodeProto]:
    """float32(acc) * multiplier, then QuantizeLinear(scale 1, y_zero_point) into ``node``'s output."""
    base = node.output[0]
    graph.set_initializer(f"{base}_mq_multiplier", multiplier)
    graph.set_initializer(f"{base}_mq_one", np.float32(1.0))
    return [
        make_node("Cast", [acc], [f"{base}_mq_acc_f32"], f"{base}_mq_acc_cast", to=TensorProto.FLOAT),
        make_node("Mul", [f"{base}_mq_acc_f32", f"{base}_mq_multiplier"], [f"{base}_mq_scaled"], f"{base}_mq_scale"),
        make_node("QuantizeLinear", [f"{base}_mq_scaled", f"{base}_mq_one", node.input[7]], [base],
                  f"{base}_mq_requantize"),
    ]


def _channel_shape(values: np.ndarray, rank: int) -> np.ndarray:
    """Per-output-channel values broadcast over an NC... tensor of ``rank`` dims; scalars stay scalars."""
    return values if values.size == 1 else values.reshape([-1] + [1] * (rank - 2))


def _lower_conv(graph: Graph, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, sx, zx, w, sw, zw, sy = node.input[:7]
    base = node.output[0]
    codes, w_zero = graph.array(w).astype(np.float64), graph.array(zw).astype(np.float64)
    rank = codes.ndim
    weight = codes - (w_zero if w_zero.size == 1 else w_zero.reshape([-1] + [1] * (rank - 1)))
    graph.set_initializer(f"{base}_mq_weight", weight)
    graph.set_initializer(f"{base}_mq_x_zero", graph.array(zx).astype(np.float64))
    conv_inputs = [f"{base}_mq_x_centered", f"{base}_mq_weight"]
    if len(node.input) > 8 and node.input[8]:
        graph.set_initializer(f"{base}_mq_bias", graph.array(node.input[8]).astype(np.float64))
        conv_inputs.append(f"{base}_mq_bias")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    multiplier = _channel_shape(requant_multiplier(graph.array(sx), graph.array(sw), graph.array(sy)), rank)
    return [
        make_node("Cast", [x], [f"{base}_mq_x_f64"], f"{base}_mq_x_cast", to=TensorProto.DOUBLE),
        make_node("Sub", [f"{base}_mq_x_f64", f"{base}_mq_x_zero"], [f"{base}_mq_x_centered"], f"{base}_mq_x_sub"),
        make_node("Conv", conv_inputs, [f"{base}_mq_acc"], f"{base}_mq_conv", **attrs),
        *_requantize(graph, node, f"{base}_mq_acc", multiplier),
    ]


def _lower_matmul(graph: Graph, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    a, sa, za, b, sb, zb, sy = node.input[:7]
    base = node.output[0]
    multiplier = requant_multiplier(graph.array(sa), graph.array(sb), graph.array(sy))
    return [
        make_node("MatMulInteger", [a, b, za, zb], [f"{base}_mq_acc"], f"{base}_mq_matmul"),
        *_requantize(graph, node, f"{base}_mq_acc", multiplier),
    ]


def lower_qoperators(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every QLinearConv / QLinearMatMul lowered (see the module docstring); models
    without them are returned unchanged. Scales, zero points and conv weights must be constants."""
    if not any(n.op_type in LOWERED for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    for node in [n for n in model.graph.node if n.op_type in LOWERED]:
        lower = _lower_conv if node.op_type == "QLinearConv" else _lower_matmul
        graph.replace_nodes([node], lower(graph, node))
    graph.remove_unused_initializers()
    return model
