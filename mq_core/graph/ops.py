"""Op kinds: one vocabulary for "what does this fx node compute", shared by placement policies and exporters.

Modules, functions and tensor methods map to a small set of kinds ("conv", "add", "reshape", ...). Backends
express placement in kinds, so they never enumerate torch functions themselves. Unknown ops are "other" (a
compute op whose output may be quantized under output placement, never passed through).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.Linear,), "linear"),
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
    ((nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish,
      nn.Hardtanh, nn.PReLU, nn.Softplus), "activation"),
)

_FUNCTION_KINDS: dict[Any, str] = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), "conv"),
    **dict.fromkeys((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), "conv_transpose"),
    F.linear: "linear",
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
    **dict.fromkeys((torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu,
                     F.leaky_relu, F.elu, F.mish, F.hardtanh, F.softplus), "activation"),
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d), "identity"),
    **dict.fromkeys((F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm), "norm"),
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


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The kind of ``node``: placeholder, output, get_attr, or an op kind from the tables above."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        return module_kind(modules[str(node.target)])
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target, "other")
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
    """The float-tensor operands of ``node`` (including those inside list arguments, e.g. of torch.cat)."""
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
