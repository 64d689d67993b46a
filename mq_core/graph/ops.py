"""Op kinds: one vocabulary for "what does this graph node compute", shared by placement policies and exporters.

Modules, functions and tensor methods map to a small set of kinds ("conv", "add", "reshape", ...). Backends
express placement in kinds, so they never enumerate torch functions themselves. Unknown ops are "other" (a
compute op whose output may be quantized under output placement, never passed through).

One table serves both capture front-ends: the torch functions an fx graph calls and the ATen operators a
``torch.export`` graph calls (looked up by their overload packet, so ``aten.add.Tensor`` and ``aten.add.Scalar``
are both "add"). Ops that create tensors from nothing but shapes (``zeros``, ``arange``) are "constant": never
quantized as outputs.

Attention masks: HF models add a mask of ``finfo.min`` to the attention scores. Such a tensor (and everything
computed from it up to the softmax) must never get a quantizer: its range is ~3.4e38 and a grid over it has a
step of ~1e36, which rounds every real score to zero. ``masked_tensors`` finds them.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

_MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.Linear,), "linear"),
    ((nn.Embedding,), "embedding"),
    ((nn.ReLU,), "relu"),
    ((nn.ReLU6,), "relu6"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
     "maxpool"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
     "avgpool"),
    ((nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle), "reshape"),
    ((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), "identity"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
      nn.InstanceNorm2d, nn.InstanceNorm3d), "norm"),
    ((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), "interpolate"),
    ((nn.Softmax, nn.LogSoftmax), "softmax"),
    ((nn.GELU,), "gelu"),
    ((nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Mish,
      nn.Hardtanh, nn.PReLU, nn.Softplus), "activation"),
)

_FUNCTION_KINDS: dict[Any, str] = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), "conv"),
    **dict.fromkeys((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), "conv_transpose"),
    F.linear: "linear",
    F.embedding: "embedding",
    **dict.fromkeys((torch.matmul, operator.matmul, torch.bmm, torch.mm), "matmul"),
    **dict.fromkeys((operator.add, operator.iadd, torch.add), "add"),
    **dict.fromkeys((operator.sub, operator.isub, torch.sub), "sub"),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul), "mul"),
    **dict.fromkeys((operator.truediv, torch.div), "div"),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate, torch.stack), "cat"),
    **dict.fromkeys((F.relu, torch.relu, F.relu_), "relu"),
    F.relu6: "relu6",
    **dict.fromkeys((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                     torch.chunk, torch.split, torch.t, F.pixel_shuffle, F.pixel_unshuffle), "reshape"),
    operator.getitem: "getitem",
    **dict.fromkeys((F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                     F.adaptive_max_pool3d, torch.max_pool2d), "maxpool"),
    **dict.fromkeys((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d), "avgpool"),
    torch.mean: "mean",
    F.interpolate: "interpolate",
    **dict.fromkeys((F.softmax, torch.softmax, F.log_softmax), "softmax"),
    **dict.fromkeys((torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.silu,
                     F.leaky_relu, F.elu, F.mish, F.hardtanh, F.softplus), "activation"),
    F.gelu: "gelu",
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d), "identity"),
    **dict.fromkeys((F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm), "norm"),
    # ATen operators of torch.export graphs, by overload packet (see module docstring)
    **dict.fromkeys((aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution), "conv"),
    **dict.fromkeys((aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d), "conv_transpose"),
    **dict.fromkeys((aten.linear, aten.addmm), "linear"),
    aten.embedding: "embedding",
    **dict.fromkeys((aten.matmul, aten.bmm, aten.mm), "matmul"),
    aten.add: "add", aten.sub: "sub", aten.rsub: "sub", aten.mul: "mul", aten.div: "div",
    **dict.fromkeys((aten.cat, aten.concat, aten.concatenate, aten.stack), "cat"),
    **dict.fromkeys((aten.relu, aten.relu_), "relu"),
    **dict.fromkeys((aten.relu6, aten.relu6_), "relu6"),
    **dict.fromkeys((aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
                     aten.unsqueeze, aten.permute, aten.transpose, aten.t, aten.expand, aten.contiguous,
                     aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.pixel_shuffle,
                     aten.pixel_unshuffle), "reshape"),
    **dict.fromkeys((aten.slice, aten.select, aten.narrow, aten.index), "getitem"),
    **dict.fromkeys((aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.adaptive_max_pool1d,
                     aten.adaptive_max_pool2d), "maxpool"),
    **dict.fromkeys((aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
                     aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d), "avgpool"),
    aten.mean: "mean",
    **dict.fromkeys((aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
                     aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_bicubic2d,
                     aten.upsample_trilinear3d), "interpolate"),
    **dict.fromkeys((aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax), "softmax"),
    **dict.fromkeys((aten.sigmoid, aten.tanh, aten.hardswish, aten.hardsigmoid, aten.silu,
                     aten.leaky_relu, aten.elu, aten.mish, aten.hardtanh, aten.softplus, aten.prelu), "activation"),
    aten.gelu: "gelu",
    **dict.fromkeys((aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.alias, aten.clone, aten.to,
                     aten._to_copy, aten.type_as), "identity"),
    **dict.fromkeys((aten.layer_norm, aten.native_layer_norm, aten.batch_norm,
                     aten._native_batch_norm_legit_no_training, aten.group_norm, aten.instance_norm), "norm"),
    **dict.fromkeys((aten.zeros, aten.ones, aten.full, aten.arange, aten.new_ones, aten.new_zeros, aten.new_full,
                     aten.zeros_like, aten.ones_like, aten.full_like, aten.scalar_tensor, aten.empty), "constant"),
}

_METHOD_KINDS: dict[str, str] = {
    **dict.fromkeys(("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous",
                     "chunk", "split", "t", "view_as", "reshape_as"), "reshape"),
    "mean": "mean",
    **dict.fromkeys(("relu", "relu_"), "relu"),
    **dict.fromkeys(("add", "add_"), "add"),
    **dict.fromkeys(("sub", "sub_"), "sub"),
    **dict.fromkeys(("mul", "mul_"), "mul"),
    **dict.fromkeys(("div", "div_"), "div"),
    **dict.fromkeys(("matmul", "bmm"), "matmul"),
    "softmax": "softmax",
    **dict.fromkeys(("sigmoid", "tanh"), "activation"),
}

#: Kinds that take two tensor operands; with a Python scalar operand they become "scalar_arith".
_BINARY = frozenset({"add", "sub", "mul", "div"})


def module_kind(module: nn.Module) -> str:
    """The op kind of a module (fused and QAT modules declare theirs with ``mq_op_kind``)."""
    kind = getattr(module, "mq_op_kind", None)  # fused / QAT modules declare their kind
    if isinstance(kind, str):
        return kind
    for types, name in _MODULE_KINDS:
        if isinstance(module, types):
            return name
    return "other"


def function_kind(target: Any) -> str:
    """The kind of a ``call_function`` target: a torch function, or an ATen operator of a torch.export graph."""
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    try:
        return _FUNCTION_KINDS.get(target, "other")
    except TypeError:  # an unhashable callable
        return "other"


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The kind of ``node``: placeholder, output, get_attr, or an op kind from the tables above."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        return module_kind(modules[str(node.target)])
    if node.op == "call_function":
        kind = function_kind(node.target)
    else:
        kind = _METHOD_KINDS.get(str(node.target), "other")
    if kind in _BINARY and len(tensor_args(node)) < 2:
        return "scalar_arith"
    return kind


def is_float_tensor(node: fx.Node) -> bool:
    """Whether ``node`` produced a floating-point tensor during shape propagation."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The float-tensor operands of ``node`` (including those inside list arguments, e.g. of torch.cat). An item of
    the list an ATen layout op returns (``aten.unbind``, ``aten.split``) reads that op's operands."""
    source = node.args[0] if node.op == "call_function" and node.target is operator.getitem and node.args else None
    if (isinstance(source, fx.Node) and isinstance(source.target, torch._ops.OpOverload)
            and function_kind(source.target) == "reshape" and not is_float_tensor(source)):
        return tensor_args(source)
    found: list[fx.Node] = []

    def visit(arg: Any) -> None:
        if isinstance(arg, fx.Node):
            if is_float_tensor(arg) and arg not in found:
                found.append(arg)
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                visit(a)

    for a in (*node.args, *node.kwargs.values()):
        visit(a)
    return found


#: Ops that keep non-negative inputs non-negative.
_SIGN_PRESERVING = frozenset({"maxpool", "avgpool", "reshape", "getitem", "identity", "mean", "cat", "interpolate"})


def produces_nonnegative(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when ``node``'s output is >= 0 by construction: ReLU-like producers (fused layers ending in
    ReLU/ReLU6 included) and sign-preserving ops (pooling, layout, cat) of such outputs."""
    kind = op_kind(node, modules)
    if kind in ("relu", "relu6"):
        return True
    if node.op == "call_module" and isinstance(getattr(modules[str(node.target)], "act", None), (nn.ReLU, nn.ReLU6)):
        return True
    if kind in _SIGN_PRESERVING:
        args = tensor_args(node)
        return bool(args) and all(produces_nonnegative(a, modules) for a in args)
    return False


#: Magnitude from which a constant is an additive mask value (``torch.finfo(float32).min`` is -3.4e38; float16's
#: -65504 is not caught by value, only as ``-inf``/``finfo.min`` of float32 models, the dtype mq calibrates in).
MASK_MAGNITUDE = 1e30
#: Meta key that shape propagation sets on a node whose example output held a mask value (a mask given as input).
MASK_VALUE_META = "mq_mask_value"


def _is_mask_constant(value: Any) -> bool:
    if isinstance(value, float):
        return math.isinf(value) or abs(value) >= MASK_MAGNITUDE
    if isinstance(value, (list, tuple)):
        return any(_is_mask_constant(v) for v in value)
    return False


def masked_tensors(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Nodes whose output holds an additive attention mask (``finfo.min``/``-inf`` where attention is masked) or a
    tensor computed from one, up to the softmax that absorbs it.

    A mask starts at an op with such a constant argument (``where(mask, 0, finfo.min)``, ``masked_fill``,
    ``(1 - m) * finfo.min``) or at a node whose example output held such a value (``MASK_VALUE_META``, set by
    shape propagation: a precomputed mask passed in as an input); it flows through every op but softmax.
    """
    masked: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        source = node.meta.get(MASK_VALUE_META, False) or (
            node.op in ("call_function", "call_method")
            and any(_is_mask_constant(a) for a in (*node.args, *node.kwargs.values())))
        inherited = any(a in masked for a in node.all_input_nodes) and op_kind(node, modules) != "softmax"
        if (source or inherited) and is_float_tensor(node):
            masked.add(node)
    return masked
