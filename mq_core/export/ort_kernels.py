"""Rewrites of the canonical QDQ ONNX that let ONNX Runtime's CPU provider run more of it in its fast integer
kernels (the ``qdq-ort`` exporter). The convolution rewrites compute the same integers; the pooling one is the
same operator under the name ONNX Runtime fuses.

ONNX Runtime (optimisations on) already fuses DequantizeLinear -> op -> QuantizeLinear into QLinearConv, QGemm,
QLinearAdd, QLinearGlobalAveragePool, ... and switches the integer convolutions to NHWC. Profiled on a
ResNet-18-shaped model (benchmarks/ort_speed.py), two places of the canonical graph still missed its fast paths:

* **Narrow-input convolutions** (an RGB stem): MLAS's symmetric int8 convolution kernel (the fast one, u8
  activations x s8 weights with zero point 0) needs a multiple of 4 input channels; a 3-channel 7x7 stem falls back
  to im2col + GEMM and costs three times as much per multiply-add as every other layer (17% of the network). A
  stride-2 convolution becomes a stride-1 one on ``SpaceToDepth(2)`` of its (padded) input: 4x the channels, half
  the kernel, the same products summed (zero weights where the kernel was padded to an even size). Other
  strides get their channels padded to a multiple of 4 (zero-point codes, zero weights). Both work on the
  integer codes (``Pad`` with the zero point, then ``SpaceToDepth``), so the int32 sums are the same integers.
* **The spatial mean of a classifier head**: torch's exporter writes ``adaptive_avg_pool2d(x, 1)`` as
  ``ReduceMean``, which ONNX Runtime runs in float between a DequantizeLinear and a QuantizeLinear and which ends
  its NHWC layout early; ``GlobalAveragePool`` (the same mean) is fused into QLinearGlobalAveragePool.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from mq_core.errors import check_choice
from mq_core.export.onnx_graph import Graph, make_node

#: Input channels must be a multiple of this for MLAS's symmetric int8 convolution kernel (its
#: ``KernelInputChannelAlignment`` on x86 and ARM); output channels a multiple of ``OUTPUT_ALIGNMENT``, at least
#: ``MIN_OUTPUT_CHANNELS`` (AVX2's alignment and output pack count, the strictest of the x86 kernels).
INPUT_ALIGNMENT = 4
OUTPUT_ALIGNMENT = 8
MIN_OUTPUT_CHANNELS = 16
#: What the ``narrow_convs`` option may be: how a convolution with too few input channels is fed.
NARROW_CONV_MODES = ("space-to-depth", "pad", "keep")


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _shape(graph: Graph, name: str) -> list[int | None] | None:
    """The static shape shape inference recorded for ``name`` (None entries for symbolic dims), or None."""
    g = graph.model.graph
    for info in (*g.value_info, *g.input, *g.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    return None


def _activation_dq(graph: Graph, tensor: str) -> onnx.NodeProto | None:
    """The per-tensor DequantizeLinear of activation codes that produces ``tensor``, or None."""
    node = graph.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3 or graph.is_constant(node.input[0]):
        return None
    per_tensor = graph.is_constant(node.input[1]) and graph.array(node.input[1]).size == 1
    return node if per_tensor and graph.is_constant(node.input[2]) else None


def _symmetric_int8_weight(graph: Graph, tensor: str) -> onnx.NodeProto | None:
    """The DequantizeLinear of constant int8 codes with zero points 0 that produces ``tensor`` (what the symmetric
    kernel takes), or None."""
    node = graph.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    if not all(graph.is_constant(i) for i in node.input[:3]):
        return None
    codes, zero = graph.array(node.input[0]), graph.array(node.input[2])
    return node if codes.dtype == np.int8 and codes.ndim == 4 and not zero.any() else None


def _narrow_conv(graph: Graph, conv: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto, list[int]] | None:
    """(input DQ, weight DQ, input shape) of a 2-D convolution the symmetric kernel refuses only for its input
    channel count, else None."""
    x, w = _activation_dq(graph, conv.input[0]), _symmetric_int8_weight(graph, conv.input[1])
    shape = _shape(graph, conv.input[0])
    if x is None or w is None or shape is None or len(shape) != 4 or None in shape[1:]:
        return None
    attrs = _attrs(conv)
    out_channels, in_channels = graph.array(w.input[0]).shape[:2]
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
            or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        return None
    if in_channels % INPUT_ALIGNMENT == 0 or out_channels % OUTPUT_ALIGNMENT or out_channels < MIN_OUTPUT_CHANNELS:
        return None
    return x, w, shape


def _feed(graph: Graph, conv: onnx.NodeProto, x: onnx.NodeProto, w: onnx.NodeProto, pads: list[int],
          weights: np.ndarray, space_to_depth: bool, attrs: dict[str, object]) -> None:
    """Feed ``conv`` the codes of its input padded with the zero point (``pads``, ONNX order) [and rearranged by
    SpaceToDepth(2)], through a DequantizeLinear of their own, with ``weights`` as its codes and ``attrs``."""
    base = conv.name or conv.output[0]
    codes, new = x.input[0], []
    if any(pads):
        pads_name, value = graph.fresh_name(f"{base}_input_pads"), graph.fresh_name(f"{base}_input_pad_value")
        graph.set_initializer(pads_name, np.array(pads, np.int64))
        graph.set_initializer(value, graph.array(x.input[2]).reshape(()))
        padded = graph.fresh_name(f"{codes}_padded")
        new.append(make_node("Pad", [codes, pads_name, value], [padded], f"{base}_input_Pad"))
        codes = padded
    if space_to_depth:
        rearranged = graph.fresh_name(f"{codes}_space_to_depth")
        new.append(make_node("SpaceToDepth", [codes], [rearranged], f"{base}_input_SpaceToDepth", blocksize=2))
        codes = rearranged
    dequantized = graph.fresh_name(f"{base}_input")
    new.append(make_node("DequantizeLinear", [codes, *x.input[1:3]], [dequantized], f"{base}_input_Dequantize",
                         **_attrs(x)))
    weight_codes = graph.fresh_name(f"{w.input[0]}_{'space_to_depth' if space_to_depth else 'padded'}")
    graph.set_initializer(weight_codes, weights)
    weight = graph.fresh_name(f"{base}_weight")
    new.append(make_node("DequantizeLinear", [weight_codes, *w.input[1:3]], [weight], f"{base}_weight_Dequantize",
                         **_attrs(w)))
    rewritten = make_node("Conv", [dequantized, weight, *conv.input[2:]], list(conv.output), conv.name, **attrs)
    graph.replace_nodes([conv], [*new, rewritten])


def _space_to_depth(graph: Graph, conv: onnx.NodeProto, x: onnx.NodeProto, w: onnx.NodeProto,
                    shape: list[int]) -> bool:
    """A stride-2 convolution as a stride-1 one on SpaceToDepth(2) of its padded input (see the module docstring).

    Output row i reads padded rows 2i .. 2i+k-1; with the kernel zero-padded to 2k' rows these are rows i .. i+k'-1
    of the space-to-depth input, whose channel (2ry + rx) * C + c holds row 2i + ry, column 2j + rx of channel c.
    The input is padded at the start as before and at the end to 2 * (out + k' - 1) rows; rows beyond the original
    padding meet only the kernel's zero padding.
    """
    attrs = _attrs(conv)
    codes = graph.array(w.input[0])
    out_channels, channels, kh, kw = codes.shape
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    half = [(kh + 1) // 2, (kw + 1) // 2]
    ends = []
    for axis, (size, k, begin, end) in enumerate(zip(shape[2:], (kh, kw), pads[:2], pads[2:])):
        out = (size + begin + end - k) // 2 + 1
        ends.append(2 * (out + half[axis] - 1) - size - begin)
    if min(ends) < 0:
        return False
    even = np.zeros((out_channels, channels, 2 * half[0], 2 * half[1]), codes.dtype)
    even[:, :, :kh, :kw] = codes
    weights = even.reshape(out_channels, channels, half[0], 2, half[1], 2).transpose(0, 3, 5, 1, 2, 4)
    attrs.update(kernel_shape=half, strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1])
    _feed(graph, conv, x, w, [0, 0, *pads[:2], 0, 0, *ends], np.ascontiguousarray(
        weights.reshape(out_channels, 4 * channels, *half)), True, attrs)
    return True


def _pad_channels(graph: Graph, conv: onnx.NodeProto, x: onnx.NodeProto, w: onnx.NodeProto) -> None:
    """Pad the input channels to a multiple of ``INPUT_ALIGNMENT``: zero-point codes meet zero weights."""
    codes = graph.array(w.input[0])
    extra = -codes.shape[1] % INPUT_ALIGNMENT
    weights = np.concatenate([codes, np.zeros((codes.shape[0], extra, *codes.shape[2:]), codes.dtype)], axis=1)
    _feed(graph, conv, x, w, [0, 0, 0, 0, 0, extra, 0, 0], weights, False, _attrs(conv))


def _global_average_pool(graph: Graph, node: onnx.NodeProto) -> bool:
    """``DQ -> ReduceMean(all spatial axes, keepdims) -> Q``  ->  the same with GlobalAveragePool."""
    shape = _shape(graph, node.input[0])
    users = graph.consumers.get(node.output[0], [])
    if shape is None or len(shape) < 3 or _activation_dq(graph, node.input[0]) is None or len(users) != 1 \
            or users[0].op_type != "QuantizeLinear" or node.output[0] in graph.outputs:
        return False
    attrs = _attrs(node)
    if len(node.input) > 1 and node.input[1]:
        if not graph.is_constant(node.input[1]):
            return False
        axes = graph.array(node.input[1]).tolist()
    else:
        axes = attrs.get("axes", [])
    if attrs.get("keepdims", 1) != 1 or sorted(a % len(shape) for a in axes) != list(range(2, len(shape))):
        return False
    graph.replace_nodes([node], [make_node("GlobalAveragePool", [node.input[0]], [node.output[0]], node.name)])
    return True


def _prune(graph: Graph) -> None:
    """Drop the nodes the rewrites left unread (an input's DequantizeLinear), and their initializers."""
    while True:
        dead = [n for n in graph.model.graph.node if not any(o in graph.consumers or o in graph.outputs
                                                               for o in n.output)]
        if not dead:
            break
        graph.remove_nodes(dead)
    graph.remove_unused_initializers()


def observed(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which each of the quantized ``tensors`` whose DequantizeLinear a rewrite removed (an
    input now fed through Pad/SpaceToDepth) has one again, unread, right after its QuantizeLinear [-> Clip], under
    the canonical names (``<tensor>_DequantizeLinear``). What the model computes is unchanged; the layer-wise
    verification finds the tensor by that name, compares it, and cuts the rewritten convolution's region there, so
    that the rewrite itself gets a local check. Kept out of the artifact: ONNX Runtime would run the unread node."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    by_name = {n.name: n for n in model.graph.node}
    for tensor in tensors:
        quantize = by_name.get(f"{tensor}_QuantizeLinear")
        if f"{tensor}_DequantizeLinear" in by_name or quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        last = by_name.get(f"{tensor}_Clip", quantize)
        output = graph.fresh_name(f"{tensor}_dequantized")
        dequantize = make_node("DequantizeLinear", [last.output[0], *quantize.input[1:3]], [output],
                               f"{tensor}_DequantizeLinear", **_attrs(quantize))
        graph.replace_nodes([last], [last, dequantize])
    return model


def for_onnxruntime(model: onnx.ModelProto, narrow_convs: str = "space-to-depth") -> tuple[onnx.ModelProto,
                                                                                          dict[str, int]]:
    """A copy of the canonical QDQ ``model`` rewritten for ONNX Runtime's integer kernels (module docstring), and
    how many of each rewrite it made.

    ``narrow_convs``: ``"space-to-depth"`` (stride-2 convolutions through SpaceToDepth, others padded), ``"pad"``
    (every one padded) or ``"keep"`` (left as they are).
    """
    check_choice("narrow_convs", narrow_convs, NARROW_CONV_MODES)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    counts = {"GlobalAveragePool": 0, "SpaceToDepth": 0, "Pad": 0}
    for node in list(model.graph.node):
        if node.op_type == "ReduceMean":
            counts["GlobalAveragePool"] += _global_average_pool(graph, node)
        elif node.op_type == "Conv" and narrow_convs != "keep":
            found = _narrow_conv(graph, node)
            if found is None:
                continue
            strides = _attrs(node).get("strides", [1, 1])
            if narrow_convs == "space-to-depth" and list(strides) == [2, 2] and _space_to_depth(graph, node, *found):
                counts["SpaceToDepth"] += 1
            else:
                _pad_channels(graph, node, *found[:2])
                counts["Pad"] += 1
    _prune(graph)
    del model.graph.value_info[:]  # rewritten tensors: infer their shapes afresh
    return onnx.shape_inference.infer_shapes(model), counts
