"""Integer-exact simulation: a prepared model computes its layers and residual adds as a runtime's integer kernels do.

``mq.integer_simulation(qmodel)`` switches it on, ``mq.integer_simulation(qmodel, runtime=None)`` off (also as a
context manager). While it is on, each op that ONNX Runtime with its graph optimisations on (``onnxruntime-opt``)
fuses into an integer kernel runs that kernel's arithmetic (``mq_core.quant.integer``): exact int32 accumulation,
the int32 bias, the float32 requantisation and its rounding. Its outputs then match the runtime's bit for bit at
any depth, where the default simulation (float32 sums rounded once) flips a few values by one step per layer and
the flips grow with depth (docs/design.md, "Integer-exact simulation").

Why a switch on the prepared model rather than a second model: ``verify``, ``verify_layers``, an evaluation loop
and the CLI all run the prepared model; with the switch on they all see the integer arithmetic, and nothing about
the model's quantizers, checkpoints or exports changes. The switch rewrites the fx graph in place: each emulated
node calls an ``IntegerOp`` module (registered as ``mq_integer_<node>``, holding no parameters or buffers, so the
state dict is unchanged) and switching off restores the node. ``deploy_view`` switches it off in its copy, so an
export is the same with the switch on or off.

Which ops: a QAT Conv layer, or Linear layer on 2-d inputs (exported as Gemm), ReLU/ReLU6 fused or not, whose
input comes from an activation quantizer (through max-pooling or layout ops) and whose only consumer is an
activation quantizer (``QLinearConv`` / ``QGemm``); a two-tensor ``add`` of two such tensors, optionally followed
by a ReLU, into an activation quantizer (``QLinearAdd``). Each op falls back to its float computation whenever the
runtime would not fuse it either: quantization off (calibration), a per-channel or wider-than-8-bit activation
grid, a ReLU the runtime keeps because the output zero point is not the grid's minimum, a ReLU6 whose grid reaches
past 6, inputs of different shapes. Everything else (pooling, the network input's QuantizeLinear, float ops) is
computed as before. An embedding lookup with a quantized table (``QEmbedding``) needs no emulation: the runtime
dequantizes the int8 table and gathers rows of it, which the default simulation computes exactly.

There are no gradients through the integer ops: running one in training mode, or with autograd recording, raises
``IntegerSimulationError``. Use it for evaluation and verification; switch it off to train or to run PTQ methods
that differentiate (AdaRound, BRECQ, QDrop).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from mq_core.errors import ConfigError, MQError
from mq_core.graph.ops import is_float_tensor, op_kind, tensor_args
from mq_core.nn.qat import QATModule
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import along_axis, dequantize, quantize
from mq_core.quant.integer import codes_of, qlinear_add, quantize_bias, requantize, requantize_multiplier

#: The layers ONNX Runtime fuses into QLinearConv (transposed convolutions are separate classes in torch).
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Runtimes whose integer kernels the simulation reproduces.
RUNTIMES = ("onnxruntime-opt",)

#: Op kinds whose output holds input values unchanged (rearranged, selected): the codes of the quantizer before them.
_VALUE_PRESERVING = frozenset({"maxpool", "reshape", "identity"})
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
_PREFIX = "mq_integer_"


class IntegerSimulationError(MQError, RuntimeError):
    """The integer-exact simulation was asked for something it does not do (gradients, an unknown runtime)."""


@dataclass(frozen=True)
class _Refs:
    """The modules an integer op reads, held outside the module tree (a plain object, not a submodule), so each
    stays registered once, where prepare put it."""

    inputs: tuple[FakeQuantizer, ...]
    output: FakeQuantizer
    layer: QATModule | None = None


def _grid_ready(fq: FakeQuantizer) -> bool:
    """A frozen per-tensor activation grid of at most 8 bits: what the runtime's integer kernels take."""
    return bool(fq.quant_enabled.item() and not fq.observe_enabled.item() and fq.is_calibrated
                and fq.scale.numel() == 1 and fq.scheme.bits <= 8)


def _storage_range(fq: FakeQuantizer) -> tuple[int, int]:
    info = torch.iinfo(fq.scheme.storage_dtype)
    return info.min, info.max


def _activation_fused(act: nn.Module | None, out: FakeQuantizer) -> bool:
    """Whether ONNX Runtime removes the activation between the op and its QuantizeLinear (so that the op fuses):
    a ReLU when the zero point is the storage minimum (``ReluQuantFusion``), a ReLU6 (``Clip(0, 6)``) when the
    grid's storage range lies within [0, 6] up to a float32 epsilon (``ClipQuantFusion``)."""
    if act is None:
        return True
    low, high = _storage_range(out)
    zero_point = int(out.zero_point.item())
    if isinstance(act, nn.ReLU):
        return zero_point == low
    if isinstance(act, nn.ReLU6):
        scale = out.scale.to(torch.float32).reshape(())
        lower = float(scale * float(low - zero_point))
        upper = float(scale * float(high - zero_point))
        return 0.0 - lower <= _FLOAT32_EPS and upper - 6.0 <= _FLOAT32_EPS
    return False


class IntegerOp(nn.Module):
    """A graph node computed as the runtime's integer kernel (see the module docstring); remembers the node's
    original ``op`` and ``target`` so that switching off restores it."""

    def __init__(self, refs: _Refs, original_op: str, original_target: Any, kernel: str) -> None:
        super().__init__()
        self.refs = refs
        self.original_op = original_op
        self.original_target = original_target
        self.kernel = kernel

    def _call_original(self, *args: torch.Tensor) -> torch.Tensor:
        if self.original_op == "call_method":
            return getattr(args[0], self.original_target)(*args[1:])
        target: Callable[..., torch.Tensor] = self.original_target
        return target(*args)

    def _check_no_grad(self, *args: torch.Tensor) -> None:
        if self.training or (torch.is_grad_enabled() and any(a.requires_grad for a in args)):
            raise IntegerSimulationError(
                f"{self.kernel} {self.refs.output.tensor!r} is simulated in integer arithmetic, which has no "
                "gradients: run the model in eval mode under torch.no_grad() (or torch.inference_mode()), or switch "
                "the integer simulation off with mq.integer_simulation(qmodel, runtime=None) to train or to run a PTQ "
                "method that differentiates."
            )

    def extra_repr(self) -> str:
        return f"{self.kernel} -> {self.refs.output.tensor}"


class IntegerLayer(IntegerOp):
    """A QAT Conv/Linear layer as ``QLinearConv`` / ``QGemm``: int32 accumulation, int32 bias, requantisation."""

    def _ready(self) -> bool:
        layer = self.refs.layer
        assert layer is not None
        fq = layer.weight_fake_quant
        weight_ready = bool(fq.quant_enabled.item() and fq.is_calibrated and not fq.normalizes_input)
        return (weight_ready and _grid_ready(self.refs.inputs[0]) and _grid_ready(self.refs.output)
                and _activation_fused(layer.act, self.refs.output))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.refs.layer
        assert layer is not None
        if not self._ready():
            return layer(x)
        self._check_no_grad(x, layer.weight)
        (x_fq,), y_fq, w_fq = self.refs.inputs, self.refs.output, layer.weight_fake_quant
        axis = 1 if isinstance(layer, _CONV_TYPES) else -1  # the output channels of a conv / a linear layer
        with torch.no_grad():
            weight, bias = layer.deploy_weight_and_bias()
            w_scale, w_zero = w_fq.export_qparams()
            w_axis = w_fq.ch_axis
            w_codes = quantize(weight.to(torch.float32), w_scale, w_zero, w_fq.scheme.qmin, w_fq.scheme.qmax, w_axis)
            w_centred = (w_codes - along_axis(w_zero, w_codes, w_axis).to(w_codes.dtype)).to(torch.float64)
            x_scale, _ = x_fq.export_qparams()
            y_scale, y_zero = y_fq.export_qparams()
            acc = layer._op(codes_of(x, x_scale), w_centred, None)
            if bias is not None:
                acc = acc + along_axis(quantize_bias(bias, x_scale, w_scale), acc, axis)
            codes = requantize(acc, requantize_multiplier(x_scale, w_scale, y_scale), y_zero, y_fq.scheme.qmin,
                               y_fq.scheme.qmax, axis)
            y = dequantize(codes, y_scale, y_zero).to(x.dtype)
        return layer._activate(y)


class IntegerAdd(IntegerOp):
    """A residual add of two quantized tensors as ``QLinearAdd``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        (a_fq, b_fq), c_fq = self.refs.inputs, self.refs.output
        relu_ok = self.kernel != "QLinearAdd+Relu" or int(c_fq.zero_point.item()) == _storage_range(c_fq)[0]
        if not (relu_ok and a.shape == b.shape and all(_grid_ready(fq) for fq in (a_fq, b_fq, c_fq))):
            return self._call_original(a, b)
        self._check_no_grad(a, b)
        with torch.no_grad():
            (a_s, a_z), (b_s, b_z), (c_s, c_z) = (fq.export_qparams() for fq in (a_fq, b_fq, c_fq))
            codes = qlinear_add(codes_of(a, a_s) + a_z, (a_s, a_z), codes_of(b, b_s) + b_z, (b_s, b_z),
                                (c_s, c_z), c_fq.scheme.qmin, c_fq.scheme.qmax)
            return dequantize(codes, c_s, c_z).to(a.dtype)


def _activation_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> FakeQuantizer | None:
    if node.op != "call_module":
        return None
    module = modules.get(str(node.target))
    if isinstance(module, FakeQuantizer) and getattr(module, "role", "activation") == "activation":
        return module
    return None


def _source_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> FakeQuantizer | None:
    """The activation quantizer whose codes ``node`` holds: itself, or one before value-preserving ops."""
    while _activation_quantizer(node, modules) is None:
        args = tensor_args(node)
        if op_kind(node, modules) not in _VALUE_PRESERVING or len(args) != 1:
            return None
        node = args[0]
    return _activation_quantizer(node, modules)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _consumer_quantizer(node: fx.Node, modules: dict[str, nn.Module], through_relu: bool) -> tuple[
        FakeQuantizer | None, bool]:
    """The activation quantizer that is ``node``'s only consumer (directly, or after one ReLU when allowed), and
    whether a ReLU stands between them."""
    user = _only_user(node)
    if user is None:
        return None, False
    fq = _activation_quantizer(user, modules)
    if fq is not None or not through_relu or op_kind(user, modules) != "relu" or len(tensor_args(user)) != 1:
        return fq, False
    after = _only_user(user)
    return (_activation_quantizer(after, modules) if after is not None else None), True


def _layer_op(node: fx.Node, modules: dict[str, nn.Module]) -> IntegerOp | None:
    layer = modules.get(str(node.target)) if node.op == "call_module" else None
    if not isinstance(layer, QATModule) or not isinstance(layer, (*_CONV_TYPES, nn.Linear)) or node.kwargs:
        return None
    if isinstance(layer, _CONV_TYPES) and layer.padding_mode != "zeros":
        return None  # an explicit Pad between DequantizeLinear and Conv: the runtime does not fuse
    args = tensor_args(node)
    if len(args) != 1 or len(node.args) != 1:
        return None
    if isinstance(layer, nn.Linear) and len(getattr(args[0].meta.get("tensor_meta"), "shape", ())) != 2:
        return None  # not 2-d: exported as MatMul + Add, not Gemm, and those kernels are not reproduced
    source = _source_quantizer(args[0], modules)
    output, _ = _consumer_quantizer(node, modules, through_relu=False)
    if source is None or output is None:
        return None
    kernel = "QLinearConv" if isinstance(layer, _CONV_TYPES) else "QGemm"
    return IntegerLayer(_Refs((source,), output, layer), node.op, node.target, kernel)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.add, torch.add)
    return node.op == "call_method" and node.target == "add"


def _add_op(node: fx.Node, modules: dict[str, nn.Module]) -> IntegerOp | None:
    if not _is_add(node) or node.kwargs or len(node.args) != 2:
        return None
    if not all(isinstance(a, fx.Node) and is_float_tensor(a) for a in node.args):
        return None
    sources = [_source_quantizer(a, modules) for a in node.args]
    output, relu = _consumer_quantizer(node, modules, through_relu=True)
    if None in sources or output is None:
        return None
    return IntegerAdd(_Refs(tuple(sources), output), node.op, node.target, "QLinearAdd+Relu" if relu else "QLinearAdd")


def _graph_modules(model: nn.Module) -> list[fx.GraphModule]:
    return [m for m in model.modules() if isinstance(m, fx.GraphModule)]


def switch_off(model: nn.Module) -> None:
    """Restore every node the integer simulation rewrote in ``model`` (nothing happens when it is off): the deploy
    view calls it on its copy, so that an export never contains the simulation's integer ops."""
    for gm in _graph_modules(model):
        _switch_off(gm)


def _switch_off(gm: fx.GraphModule) -> None:
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(_PREFIX):
            op = gm.get_submodule(str(node.target))
            if isinstance(op, IntegerOp):
                gm.delete_submodule(str(node.target))
                node.op, node.target = op.original_op, op.original_target
                changed = True
    if changed:
        gm.recompile()


def _switch_on(gm: fx.GraphModule) -> dict[str, str]:
    modules = dict(gm.named_modules())
    emulated: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        op = _layer_op(node, modules) or _add_op(node, modules)
        if op is None:
            continue
        name = f"{_PREFIX}{node.name}"
        gm.add_submodule(name, op.train(gm.training))
        node.op, node.target = "call_module", name
        emulated[op.refs.output.tensor or node.name] = op.kernel
    if emulated:
        gm.recompile()
    return emulated


class IntegerSimulation:
    """What ``integer_simulation`` switched on: ``ops`` maps each emulated op's output tensor to its kernel
    (``QLinearConv``, ``QGemm``, ``QLinearAdd``, ``QLinearAdd+Relu``). As a context manager, it switches the
    simulation off on exit."""

    def __init__(self, model: nn.Module, runtime: str | None, ops: dict[str, str]) -> None:
        self.model = model
        self.runtime = runtime
        self.ops = ops

    def __enter__(self) -> IntegerSimulation:
        return self

    def __exit__(self, *exc: object) -> None:
        integer_simulation(self.model, runtime=None)

    def __repr__(self) -> str:
        return f"IntegerSimulation(runtime={self.runtime!r}, {len(self.ops)} integer ops)"


def integer_simulation(model: nn.Module, runtime: str | None = "onnxruntime-opt") -> IntegerSimulation:
    """Switch the integer-exact simulation of ``runtime``'s kernels on for a prepared model (``runtime=None``: off,
    the default float simulation). Returns what was switched on; usable as ``with integer_simulation(qmodel):``.

    Raises ``ConfigError`` for a runtime whose kernels are not reproduced, or a model that is not a prepared one.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(
            f"the integer simulation reproduces the integer kernels of {', '.join(RUNTIMES)}, not {runtime!r}. Use "
            "runtime='onnxruntime-opt' (ONNX Runtime with its graph optimisations on), or runtime=None for the "
            "default simulation, which every runtime is verified against."
        )
    graphs = _graph_modules(model)
    if not graphs:
        raise ConfigError(
            f"integer_simulation needs a prepared model (mq.prepare), got a {type(model).__name__} without a traced "
            "graph."
        )
    switch_off(model)
    ops: dict[str, str] = {}
    if runtime is not None:
        for gm in graphs:
            ops.update(_switch_on(gm))
    return IntegerSimulation(model, runtime, ops)
