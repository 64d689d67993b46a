"""QDQ -> QOperator rewrite: integer operators where the pattern allows, DQ -> op -> Q everywhere else.

Patterns (x, w: DequantizeLinear outputs of an activation and of integer weight codes; Q: the output's
per-tensor QuantizeLinear):

* ``Conv(x, w, b) [-> Relu|Clip] -> Q``  ->  ``QLinearConv`` with int32 bias ``round(b / (s_x * s_w))`` (zero point 0);
* ``MatMul(x, y) -> Q`` (y an activation or a weight) and bias-free ``Gemm`` -> ``QLinearMatMul``;
* ``Gemm(x, w, b)`` / ``MatMul(x, w) -> Add(b)`` -> Q: QLinearMatMul has no bias input and a requantized output
  cannot take an exact bias add, so these become the integer-exact form ``MatMulInteger -> Add(int32 bias) ->
  Cast -> Mul(s_x * s_w / s_y) -> QuantizeLinear(scale 1, z_y)``: the same arithmetic as QLinearConv's bias path,
  in standard ops both ONNX Runtime and TVM import.

A Relu or Clip between the layer and Q is dropped only when Q's grid already clamps there (Q(low) is the lowest
code, Q(high) the highest: for Relu, zero point == qmin); otherwise the layer stays in DQ -> op -> Q form, as do
ConvTranspose, average pooling, adds and every other op. Before matching, per-tensor DequantizeLinear nodes are
moved past layout-only ops (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Gather with constant indices) and
MaxPool, so that a conv after a max-pool and attention's matmuls see quantized inputs: (q - z) * s with s > 0 is
increasing and elementwise, so these ops give the same result on codes as on dequantized values.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from mq_core.plugin_api import ExportError, Graph, make_node
from mq_tvm.lowering import requant_multiplier

#: ops a per-tensor DequantizeLinear commutes with exactly: layout ops, and MaxPool (dequantization is increasing).
COMMUTING_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "MaxPool"})
INT32 = np.iinfo(np.int32)
ONE = "mq_requantize_one"


def _dq(graph: Graph, tensor: str, weight: bool) -> onnx.NodeProto | None:
    """The DequantizeLinear producing ``tensor``: of constant codes (``weight``) or of a per-tensor activation."""
    node = graph.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    if weight:
        return node if graph.is_constant(node.input[0]) else None
    per_tensor = graph.is_constant(node.input[1]) and graph.array(node.input[1]).size == 1
    return node if per_tensor and not graph.is_constant(node.input[0]) else None


def _constant(graph: Graph, name: str) -> np.ndarray | None:
    return graph.array(name) if name and graph.is_constant(name) else None


def _clamps(graph: Graph, act: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """Whether Q's grid saturates where ``act`` (Relu, or Clip with constant bounds) clamps."""
    scale, zero = graph.array(q.input[1]).astype(np.float32), graph.array(q.input[2])
    info = np.iinfo(zero.dtype)
    if act.op_type == "Relu":
        low, high = np.float32(0.0), None
    else:
        bounds = [act.input[i] if len(act.input) > i else "" for i in (1, 2)]
        if any(b and not graph.is_constant(b) for b in bounds):
            return False
        low, high = (_constant(graph, b) for b in bounds)

    def code(v: np.ndarray) -> float:
        return float(np.round(np.float32(v) / scale) + zero.astype(np.float32))

    return (low is None or code(low) <= info.min) and (high is None or code(high) >= info.max)


def _quantized_by(graph: Graph, tensor: str, depth: int = 0) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """The per-tensor QuantizeLinear that is ``tensor``'s only consumer, directly or through one droppable
    Relu/Clip (returned as the nodes to drop)."""
    users = graph.consumers.get(tensor, [])
    if tensor in graph.outputs or len(users) != 1:
        return None
    user = users[0]
    if user.op_type == "QuantizeLinear" and len(user.input) == 3 and graph.is_constant(user.input[1]) \
            and graph.array(user.input[1]).size == 1 and graph.is_constant(user.input[2]):
        return [], user
    if depth == 0 and user.op_type in ("Relu", "Clip"):
        found = _quantized_by(graph, user.output[0], 1)
        if found is not None and _clamps(graph, user, found[1]):
            return [user], found[1]
    return None


def _int32_bias(graph: Graph, bias: str, x_scale: str, w_scale: str, layer: str) -> np.ndarray:
    """round(b / (s_x * s_w)) as int32 (s_x * s_w in float32, as ONNX Runtime's quantizer computes it)."""
    values = graph.array(bias).astype(np.float64)
    bias_scale = np.float32(graph.array(x_scale)) * graph.array(w_scale).astype(np.float32)
    codes = np.round(values / bias_scale.astype(np.float64))
    if codes.size and (codes.min() < INT32.min or codes.max() > INT32.max):
        raise ExportError(f"the bias of {layer} does not fit int32 at scale s_x * s_w (|b| / scale reaches "
                          f"{np.abs(codes).max():.3g}); widen the input or weight ranges, or export with 'tvm' (QDQ).")
    return codes.astype(np.int32)


def propagate_dequantize(graph: Graph) -> None:
    """Move per-tensor DequantizeLinear nodes past ``COMMUTING_OPS`` (repeatedly), leaving those ops on codes."""
    moved = True
    while moved:
        moved = False
        for node in graph.model.graph.node:
            if node.op_type not in COMMUTING_OPS or not node.input:
                continue
            dq = _dq(graph, node.input[0], weight=False)
            if dq is None or not all(graph.is_constant(i) for i in node.input[1:] if i):
                continue
            out = node.output[0]
            codes = graph.fresh_name(f"{out}_quantized")
            on_codes = onnx.NodeProto.FromString(node.SerializeToString())
            on_codes.input[0], on_codes.output[0] = dq.input[0], codes
            after = make_node("DequantizeLinear", [codes, dq.input[1], dq.input[2]], [out], f"{out}_DequantizeLinear")
            graph.replace_nodes([node], [on_codes, after])
            moved = True
            break


def _weight_codes(graph: Graph, dq: onnx.NodeProto, transpose: bool) -> str | None:
    """Name of the weight codes as a [K, N] matrix (per-tensor or per-column scales), or None if unusable."""
    codes = graph.array(dq.input[0])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if codes.ndim != 2 or (graph.array(dq.input[1]).size > 1 and axis != (0 if transpose else 1)):
        return None
    if not transpose:
        return dq.input[0]
    name = f"{dq.input[0]}_transposed"
    graph.set_initializer(name, np.ascontiguousarray(codes.T))
    return name


def _conv(graph: Graph, conv: onnx.NodeProto) -> None:
    """Conv(x, w, b) [-> Relu|Clip] -> Q  ->  QLinearConv, when every part qualifies."""
    x, w = _dq(graph, conv.input[0], weight=False), _dq(graph, conv.input[1], weight=True)
    tail = _quantized_by(graph, conv.output[0])
    bias = conv.input[2] if len(conv.input) > 2 else ""
    if x is None or w is None or tail is None or (bias and not graph.is_constant(bias)):
        return
    if graph.array(w.input[1]).size > 1 and next((a.i for a in w.attribute if a.name == "axis"), 1) != 0:
        return
    drop, q = tail
    inputs = [*x.input[:3], *w.input[:3], *q.input[1:3]]
    if bias:
        name = graph.fresh_name(f"{q.output[0]}_bias")
        graph.set_initializer(name, _int32_bias(graph, bias, x.input[1], w.input[1], conv.name or conv.output[0]))
        inputs.append(name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    node = make_node("QLinearConv", inputs, [q.output[0]], f"{q.output[0]}_QLinearConv", **attrs)
    graph.replace_nodes([conv, *drop, q], [node])


def _matmul_operands(graph: Graph, node: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto, str] | None:
    """(activation DQ, B's DQ, name of B's codes as [K, N]) of a MatMul or of a Gemm without transA/alpha/beta."""
    a = _dq(graph, node.input[0], weight=False)
    if a is None:
        return None
    if node.op_type == "Gemm":
        attrs = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        w = _dq(graph, node.input[1], weight=True)
        codes = _weight_codes(graph, w, bool(attrs.get("transB", 0))) if w is not None else None
        return (a, w, codes) if codes is not None else None
    b = _dq(graph, node.input[1], weight=False)
    if b is not None:
        return a, b, b.input[0]
    transposed = graph.producer.get(node.input[1])
    if transposed is not None and transposed.op_type == "Transpose" and \
            [list(x.ints) for x in transposed.attribute if x.name == "perm"] == [[1, 0]]:
        w = _dq(graph, transposed.input[0], weight=True)
        codes = _weight_codes(graph, w, True) if w is not None else None
        return (a, w, codes) if codes is not None else None
    w = _dq(graph, node.input[1], weight=True)
    codes = _weight_codes(graph, w, False) if w is not None else None
    return (a, w, codes) if codes is not None else None


def _bias_add(graph: Graph, node: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str]:
    """For a MatMul followed only by ``Add(constant 1-D bias)``: (the Add, the bias); for a Gemm: (None, its C)."""
    if node.op_type == "Gemm":
        return None, node.input[2] if len(node.input) > 2 else ""
    users = graph.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in graph.outputs:
        add = users[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if graph.is_constant(other) and graph.array(other).ndim == 1:
            return add, other
    return None, ""


def _matmul(graph: Graph, node: onnx.NodeProto) -> None:
    """MatMul / Gemm [-> Add(bias)] -> Q  ->  QLinearMatMul, or the MatMulInteger form when there is a bias."""
    operands = _matmul_operands(graph, node)
    add, bias = _bias_add(graph, node)
    if operands is None or (bias and not (graph.is_constant(bias) and graph.array(bias).ndim == 1)):
        return
    tail = _quantized_by(graph, (add or node).output[0])
    if tail is None:
        return
    (a, b, codes), (drop, q) = operands, tail
    y = q.output[0]
    old = [node, *([add] if add is not None else []), *drop, q]
    if not bias:
        new = [make_node("QLinearMatMul", [*a.input[:3], codes, *b.input[1:3], *q.input[1:3]], [y],
                         f"{y}_QLinearMatMul")]
        graph.replace_nodes(old, new)
        return
    bias_name, multiplier = graph.fresh_name(f"{y}_bias"), graph.fresh_name(f"{y}_multiplier")
    graph.set_initializer(bias_name, _int32_bias(graph, bias, a.input[1], b.input[1], node.name or node.output[0]))
    graph.set_initializer(multiplier, requant_multiplier(graph.array(a.input[1]), graph.array(b.input[1]),
                                                         graph.array(q.input[1])))
    graph.set_initializer(ONE, np.float32(1.0))
    acc, biased, real, scaled = (graph.fresh_name(f"{y}_{s}") for s in ("acc", "acc_biased", "acc_float", "scaled"))
    new = [
        make_node("MatMulInteger", [a.input[0], codes, a.input[2], b.input[2]], [acc], f"{y}_MatMulInteger"),
        make_node("Add", [acc, bias_name], [biased], f"{y}_AddBias"),
        make_node("Cast", [biased], [real], f"{y}_Cast", to=TensorProto.FLOAT),
        make_node("Mul", [real, multiplier], [scaled], f"{y}_Requantize"),
        make_node("QuantizeLinear", [scaled, ONE, q.input[2]], [y], f"{y}_QuantizeLinear"),
    ]
    graph.replace_nodes(old, new)


def _prune(graph: Graph) -> None:
    """Drop nodes whose outputs nothing reads (DequantizeLinear nodes the integer ops made redundant)."""
    while True:
        dead = [n for n in graph.model.graph.node
                if not any(o in graph.consumers or o in graph.outputs for o in n.output)]
        if not dead:
            break
        graph.remove_nodes(dead)
    graph.remove_unused_initializers()


def to_qoperator(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A QOperator copy of the QDQ ``model`` and the count of each integer op it now holds."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    propagate_dequantize(graph)
    for node in list(model.graph.node):
        if node.op_type == "Conv":
            _conv(graph, node)
        elif node.op_type in ("MatMul", "Gemm"):
            _matmul(graph, node)
    _prune(graph)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QLinearConv", "QLinearMatMul", "MatMulInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    del model.graph.value_info[:]  # rewritten tensors: infer their shapes afresh
    return onnx.shape_inference.infer_shapes(model), counts
