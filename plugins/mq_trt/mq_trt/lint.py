"""A structural lint of a Q/DQ ONNX against TensorRT's explicit-quantization rules.

No TensorRT can run where mq is tested, so an explicit-quantization ONNX is checked twice: numerically in ONNX
Runtime (same Q/DQ semantics) and structurally here, against what TensorRT 10/11 needs to build INT8 kernels.
``lint_qdq`` names every violation (node, rule, message) instead of stopping at the first, so a user sees the
whole list in one export attempt. The rules:

``constant-qparams``
    Every QuantizeLinear/DequantizeLinear scale and zero point is a constant (TensorRT folds them at build time).
``int8``
    Every zero point is given and is int8. A missing zero point means uint8 in ONNX, and TensorRT has no uint8
    Q/DQ.
``zero-point``
    Every zero point is 0: TensorRT quantization is symmetric.
``activation-per-tensor``
    An activation (a QuantizeLinear of a tensor computed at run time) has one scale.
``weight-per-channel``
    A weight (a DequantizeLinear of a constant, integer codes or a QuantizeLinear of a float constant) has one
    scale per output channel, on the output-channel axis of the layer reading it: 0 for Conv and for Gemm with
    ``transB=1``, 1 for ConvTranspose (weights laid out [in, out/groups, ...]) and Gemm with ``transB=0``, the
    last axis of a MatMul's right operand; Transposes between the weight and the layer are followed. A layer
    with one output channel may use a single scale.
``weight-narrow-range``
    Weight codes lie in [-127, 127]: TensorRT's weight grid is narrow (scale = max|w| / 127).
``quantized-inputs``
    Inputs 0 and 1 (data and weight, or both operands of a MatMul) of every Conv, ConvTranspose, Gemm and MatMul
    come from a DequantizeLinear, possibly through ops that keep values on their grid (``GRID_PRESERVING``:
    layout ops, max pooling, slicing), which TensorRT propagates a DequantizeLinear through. A layer with
    *neither* input quantized is a float layer on purpose (``prepare(..., skip=[...])``), which TensorRT runs in
    float, and is not reported; one with a single quantized input is, since that quantization is wasted.
``residual-add``
    Both inputs of a residual Add come from a DequantizeLinear (as above), so TensorRT fuses the add into the
    INT8 convolution. A *residual Add* is an Add of two tensors computed at run time (neither a constant nor
    computed from constants only) of which at least one is the output of a Conv, ConvTranspose, Gemm or MatMul,
    looking back only through QuantizeLinear/DequantizeLinear and bias Adds (an Add with one constant input):
    exactly the ``conv -> [bias] -> add`` chain TensorRT fuses (any other op, ReLU included, ends the chain).
    Adds with a constant input (biases, the ``+ 1`` inside an exported GELU) are not residual.
``one-scale-per-tensor``
    A tensor is never quantized by two QuantizeLinear nodes with different scales or zero points, counting
    QuantizeLinear nodes that read it through value-preserving ops (``SAME_VALUES``: reshapes, transposes, max
    pooling), because TensorRT moves a QuantizeLinear backwards through those ops onto the tensor itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from mq_core.plugin_api import Graph

#: Layers whose inputs TensorRT needs quantized (and whose output-channel axis the weight rule checks).
LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ops whose output is made of (a subset of) the input's values unchanged: a DequantizeLinear before them still
#: feeds the consumer grid values. The data input is input 0.
GRID_PRESERVING = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool",
                             "GlobalMaxPool", "Gather", "Slice", "Split"})
#: Ops whose output is the same tensor's values rearranged (or reduced by max): quantizing before or after them
#: is the same quantization.
SAME_VALUES = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool",
                         "GlobalMaxPool"})
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127

RULES = ("constant-qparams", "int8", "zero-point", "activation-per-tensor", "weight-per-channel",
         "weight-narrow-range", "quantized-inputs", "residual-add", "one-scale-per-tensor")


@dataclass(frozen=True)
class Violation:
    """One broken rule: the node it is about, the rule's name (see ``RULES``) and what is wrong."""

    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class _Linter:
    """One pass over a model: violations in graph order, the one-scale-per-tensor ones last."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = Graph(model)
        self.nodes = list(model.graph.node)
        self.violations: list[Violation] = []
        self.static = self._static_tensors()

    def _static_tensors(self) -> set[str]:
        """Constants and tensors computed from constants only (TensorRT folds them at build time)."""
        static = set(self.graph.initializers) | {""}
        for node in self.nodes:  # ONNX graphs are topologically sorted
            if all(i in static for i in node.input):
                static.update(node.output)
        return static

    def add(self, node: onnx.NodeProto, rule: str, message: str) -> None:
        self.violations.append(Violation(node.name or node.output[0], rule, message))

    # --- graph queries --------------------------------------------------------------------------------------
    def is_static(self, name: str) -> bool:
        return name in self.static

    def constant(self, name: str) -> np.ndarray | None:
        return self.graph.array(name) if name and self.graph.is_constant(name) else None

    def source(self, name: str, through: frozenset[str]) -> str:
        """Walk back from tensor ``name`` through single-data-input ops of the ``through`` kinds."""
        seen = set()
        while name not in seen:
            seen.add(name)
            producer = self.graph.producer.get(name)
            if producer is None or producer.op_type not in through:
                break
            name = producer.input[0]
        return name

    def dequantized(self, name: str) -> bool:
        producer = self.graph.producer.get(self.source(name, GRID_PRESERVING))
        return producer is not None and producer.op_type == "DequantizeLinear"

    # --- Q/DQ nodes -----------------------------------------------------------------------------------------
    def check_qdq_node(self, node: onnx.NodeProto) -> None:
        scale = node.input[1] if len(node.input) > 1 else ""
        zero = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "DequantizeLinear" and self._pairs_with_quantize(node, scale, zero):
            return  # the QuantizeLinear of the pair carries the same parameters and is reported instead
        if not self.graph.is_constant(scale) or (zero and not self.graph.is_constant(zero)):
            self.add(node, "constant-qparams", "scale and zero point must be constants (initializers); TensorRT "
                                               "cannot build an engine with Q/DQ parameters computed at run time.")
            return
        if not zero:
            codes = self.constant(node.input[0]) if node.op_type == "DequantizeLinear" else None
            dtype = "uint8" if codes is None else str(codes.dtype)
            if dtype != "int8":
                self.add(node, "int8", f"has no zero point, so it is {dtype}; TensorRT needs an int8 zero point.")
            return
        z = self.graph.array(zero)
        if z.dtype != np.int8:
            self.add(node, "int8", f"zero point is {z.dtype}; TensorRT supports int8 Q/DQ only (signed, symmetric).")
        if np.any(z != 0):
            values = sorted({int(v) for v in np.ravel(z)})
            self.add(node, "zero-point", f"zero point {values[:4]} is not 0; TensorRT quantization is symmetric.")

    def _pairs_with_quantize(self, node: onnx.NodeProto, scale: str, zero: str) -> bool:
        producer = self.graph.producer.get(node.input[0])
        return producer is not None and producer.op_type == "QuantizeLinear" and list(producer.input[1:]) == [
            i for i in (scale, zero) if i]

    def check_activation(self, quantize: onnx.NodeProto) -> None:
        scale = self.constant(quantize.input[1])
        if scale is not None and scale.size != 1:
            self.add(quantize, "activation-per-tensor",
                     f"activation {quantize.input[0]!r} has {scale.size} scales; TensorRT quantizes activations "
                     "per tensor (one scale).")

    def check_weight(self, dequantize: onnx.NodeProto, weight: str, codes: np.ndarray) -> None:
        """``weight``: the tensor the layer reads; ``codes``: the integer codes it is dequantized from."""
        scale = self.constant(dequantize.input[1])
        if scale is None:
            return
        rank = codes.ndim
        axis = int(_attr(dequantize, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        expected = self.output_channel_axes(weight, rank)
        if scale.size == 1 and scale.ndim <= 1:
            if not expected or any(codes.shape[a] != 1 for a in expected):
                self.add(dequantize, "weight-per-channel",
                         f"weight {dequantize.input[0]!r} has one scale; TensorRT needs one scale per output "
                         f"channel (axis {sorted(expected) or 'of the output channels'}).")
        elif scale.ndim != 1 or not 0 <= axis < rank or scale.size != codes.shape[axis]:
            self.add(dequantize, "weight-per-channel",
                     f"weight {dequantize.input[0]!r} of shape {list(codes.shape)} has scales of shape "
                     f"{list(scale.shape)} on axis {axis}; expected one scale per channel of one axis.")
        elif expected and axis not in expected:
            self.add(dequantize, "weight-per-channel",
                     f"weight {dequantize.input[0]!r} is quantized per channel on axis {axis}, but its layer's "
                     f"output channels are on axis {sorted(expected)}.")
        low = int(codes.min()) if codes.size else 0
        if low < WEIGHT_QMIN or (codes.size and int(codes.max()) > WEIGHT_QMAX):
            self.add(dequantize, "weight-narrow-range",
                     f"weight {dequantize.input[0]!r} has codes outside [{WEIGHT_QMIN}, {WEIGHT_QMAX}] (min {low}); "
                     "TensorRT weights use the narrow int8 range (scale = max|w| / 127).")

    def output_channel_axes(self, tensor: str, rank: int, perm: tuple[int, ...] | None = None) -> set[int]:
        """Axes of ``tensor`` (rank ``rank``) holding the output channels of the linear layers that read it."""
        perm = perm or tuple(range(rank))
        axes: set[int] = set()
        for consumer in self.graph.consumers.get(tensor, []):
            if consumer.op_type == "Transpose":
                order = _attr(consumer, "perm") or list(reversed(range(rank)))
                inner = tuple(perm[int(p)] for p in order)  # output axis k holds our axis inner[k]
                axes |= self.output_channel_axes(consumer.output[0], rank, inner)
            elif consumer.op_type == "Identity":
                axes |= self.output_channel_axes(consumer.output[0], rank, perm)
            elif consumer.op_type in LINEAR_OPS:
                at = _layer_channel_axis(consumer, list(consumer.input).index(tensor), rank)
                if at is not None:
                    axes.add(perm[at])
        return axes

    # --- layers ---------------------------------------------------------------------------------------------
    def check_linear(self, node: onnx.NodeProto) -> None:
        roles = ("data", "weight") if node.op_type != "MatMul" else ("left operand", "right operand")
        quantized = [self.dequantized(name) for name in node.input[:2]]
        if not any(quantized):
            return  # a float layer by intent (prepare(..., skip=[...])): TensorRT runs it in float
        for index, role in enumerate(roles):
            if index >= len(quantized) or quantized[index]:
                continue
            kind = "a float constant" if self.is_static(node.input[index]) else "a float tensor"
            self.add(node, "quantized-inputs",
                     f"{node.op_type} {role} {node.input[index]!r} is {kind} without Q/DQ; TensorRT runs the layer "
                     "in INT8 only when both its data and weight inputs come from a DequantizeLinear.")

    def from_linear(self, name: str) -> bool:
        """Whether ``name`` is a linear layer's output, looking back through Q/DQ pairs and bias Adds."""
        seen = set()
        while name not in seen:
            seen.add(name)
            producer = self.graph.producer.get(name)
            if producer is None:
                return False
            if producer.op_type in LINEAR_OPS:
                return True
            if producer.op_type in ("DequantizeLinear", "QuantizeLinear"):
                name = producer.input[0]
            elif producer.op_type == "Add" and sum(self.is_static(i) for i in producer.input) == 1:
                name = next(i for i in producer.input if not self.is_static(i))
            else:
                return False
        return False

    def check_add(self, node: onnx.NodeProto) -> None:
        inputs = list(node.input)
        if len(inputs) != 2 or any(self.is_static(i) for i in inputs) or not any(map(self.from_linear, inputs)):
            return
        for name in inputs:
            if not self.dequantized(name):
                self.add(node, "residual-add",
                         f"residual Add input {name!r} has no Q/DQ; quantize both inputs of a residual add so "
                         "TensorRT fuses it into the INT8 convolution.")

    def check_one_scale(self, quantizes: list[onnx.NodeProto]) -> None:
        groups: dict[str, list[onnx.NodeProto]] = {}
        for q in quantizes:
            groups.setdefault(self.source(q.input[0], SAME_VALUES), []).append(q)
        for tensor, nodes in groups.items():
            params = {self._qparams_key(q) for q in nodes}
            if len(params) > 1:
                names = ", ".join(q.name or q.output[0] for q in nodes)
                self.add(nodes[-1], "one-scale-per-tensor",
                         f"tensor {tensor!r} is quantized with {len(params)} different scales/zero points (by "
                         f"{names}); give it one quantizer, shared by every consumer.")

    def _qparams_key(self, node: onnx.NodeProto) -> tuple[bytes, bytes]:
        scale = self.constant(node.input[1])
        zero = self.constant(node.input[2]) if len(node.input) > 2 else None
        return (b"" if scale is None else np.asarray(scale, np.float32).tobytes(),
                b"" if zero is None else np.asarray(zero).astype(np.int64).tobytes())

    # --- driver ---------------------------------------------------------------------------------------------
    def run(self) -> list[Violation]:
        quantizes = []
        for node in self.nodes:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                self.check_qdq_node(node)
            if node.op_type == "QuantizeLinear":
                quantizes.append(node)
                if not self.is_static(node.input[0]):
                    self.check_activation(node)
            elif node.op_type == "DequantizeLinear":
                self._check_if_weight(node)
            elif node.op_type in LINEAR_OPS:
                self.check_linear(node)
            elif node.op_type == "Add":
                self.check_add(node)
        self.check_one_scale(quantizes)
        return self.violations

    def _check_if_weight(self, dequantize: onnx.NodeProto) -> None:
        codes = self.constant(dequantize.input[0])
        if codes is None:
            quantize = self.graph.producer.get(dequantize.input[0])
            weight = self.constant(quantize.input[0]) if quantize is not None and (
                quantize.op_type == "QuantizeLinear") else None
            if weight is None:
                return
            codes = _quantize(weight, self.constant(quantize.input[1]), _attr(quantize, "axis", 1))
        self.check_weight(dequantize, dequantize.output[0], codes)


def _layer_channel_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis of input ``index`` of linear layer ``node`` (None: not a weight position)."""
    if node.op_type == "Conv":
        return 0 if index == 1 else None
    if node.op_type == "ConvTranspose":
        return 1 if index == 1 else None
    if node.op_type == "Gemm" and index in (0, 1):
        transposed = bool(_attr(node, "transB" if index == 1 else "transA", 0))
        return int(transposed) if index == 0 else int(not transposed)  # A' is [M, K], B' is [K, N]
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 1 if index == 1 else rank - 2
    return None


def _quantize(weight: np.ndarray, scale: np.ndarray | None, axis: int) -> np.ndarray:
    """Codes a float weight gets from its QuantizeLinear (zero point 0, int8 saturation, half to even)."""
    if scale is None:
        return np.zeros(weight.shape, np.int8)
    s = np.asarray(scale, np.float32)
    if s.size > 1:
        shape = [1] * weight.ndim
        shape[axis % weight.ndim] = -1
        s = s.reshape(shape)
    codes = np.round(weight.astype(np.float32) / s)
    return np.clip(codes, -128, 127).astype(np.int8)


def lint_qdq(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of TensorRT's explicit-quantization rules in ``model`` (see the module docstring)."""
    return _Linter(model).run()


def format_violations(violations: list[Violation], limit: int = 20) -> str:
    """One line per violation (at most ``limit``, then a count of the rest)."""
    lines = [f"  - {v}" for v in violations[:limit]]
    if len(violations) > limit:
        lines.append(f"  ... and {len(violations) - limit} more")
    return "\n".join(lines)


