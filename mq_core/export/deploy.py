"""The deploy view of a prepared model: what the target computes, with nothing left to learn or observe.

* QAT layers become ``DeployLayer``: BN folded, the weight stored as integer codes plus qparams and dequantized by
  ``mq::dequantize`` (an int8 initializer + DequantizeLinear in ONNX).
* Activation fake quantizers become ``DeployQuantizer``: frozen scale/zero-point buffers and
  ``mq::quantize_dequantize`` (QuantizeLinear + DequantizeLinear in ONNX). Learnable quantizers are frozen into
  the fixed qparams they are equivalent to (``FakeQuantizer.export_qparams``).

Running the deploy view in torch gives the exact-rounding simulation; exporting it gives the canonical QDQ ONNX.

The same op applied twice to the same tensor (``flatten(y)`` in two heads) is two fx nodes with a quantizer each,
but one tensor in ONNX: the exporter's common-subexpression elimination merges the ops, and their Q/DQ pairs too
when the qparams agree. The deploy view therefore computes such a quantized tensor once (``share_duplicates``), so
that every quantized tensor it holds is one tensor of the exported graph; quantizers whose qparams differ (learned
separately) stay apart and the canonical export gives each its own name.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from mq_core.errors import ExportError
from mq_core.export import ops  # noqa: F401  (registers the mq:: custom ops)
from mq_core.graph import integer_sim
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import quantize
from mq_core.quant.scheme import QuantScheme
from mq_core.quant.switches import quantizers
from mq_core.text import shorten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenQuant:
    """Frozen qparams of one quantized tensor: what exporters write into ranges files and manifests."""

    scheme: QuantScheme
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None

    @property
    def narrow(self) -> bool:
        """Whether the grid is narrower than its storage type (then an integer Clip enforces it)."""
        info = torch.iinfo(self.scheme.storage_dtype)
        return (self.scheme.qmin, self.scheme.qmax) != (info.min, info.max)


def freeze(fq: FakeQuantizer) -> FrozenQuant:
    scale, zero_point = fq.export_qparams()
    scheme = fq.scheme
    if scheme.bits > 8:
        raise ExportError(
            f"quantizer {fq.qname} uses {scheme.bits}-bit {scheme.describe()}; ONNX export supports grids of at most "
            "8 bits (int8/uint8 Q/DQ). Use 8 bits or fewer for deployable models."
        )
    return FrozenQuant(scheme, scale.to(torch.float32), zero_point.to(scheme.storage_dtype), fq.ch_axis)


class DeployQuantizer(nn.Module):
    """A frozen activation quantizer (QuantizeLinear + DequantizeLinear on export)."""

    def __init__(self, fq: FakeQuantizer, tensor: str) -> None:
        super().__init__()
        self.frozen = freeze(fq)
        self.tensor = tensor
        self.qname = fq.qname
        self.register_buffer("scale", self.frozen.scale.clone())
        self.register_buffer("zero_point", self.frozen.zero_point.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scheme = self.frozen.scheme
        axis = -1 if self.frozen.axis is None else self.frozen.axis
        return torch.ops.mq.quantize_dequantize(
            x, self.scale, self.zero_point, scheme.qmin, scheme.qmax, axis, self.frozen.narrow
        )

    def extra_repr(self) -> str:
        return f"tensor={self.tensor}, {self.frozen.scheme.describe()}"


class DeployLayer(nn.Module):
    """A float layer (BN folded) whose weight is stored as integer codes and dequantized in forward."""

    def __init__(self, qat: nn.Module) -> None:
        super().__init__()
        fq: FakeQuantizer = qat.weight_fake_quant
        with torch.no_grad():
            float_module = qat.to_float()  # BN folded; its weight is what weight_fake_quant sees in eval mode
        layer, act = (float_module[0], float_module[1]) if isinstance(float_module, nn.Sequential) else (
            float_module, None)
        self.frozen = freeze(fq)
        self.qname = fq.qname
        codes = quantize(layer.weight.detach().float(), self.frozen.scale, self.frozen.zero_point, fq.scheme.qmin,
                         fq.scheme.qmax, self.frozen.axis)
        del layer._parameters["weight"]
        if getattr(layer, "bias", None) is not None:  # an embedding has none
            layer.bias.requires_grad_(False)
        self.layer = layer.eval()
        self.act = act
        self.register_buffer("weight", codes.to(fq.scheme.storage_dtype))
        self.register_buffer("weight_scale", self.frozen.scale.clone())
        self.register_buffer("weight_zero_point", self.frozen.zero_point.clone())

    def dequantized_weight(self) -> torch.Tensor:
        axis = -1 if self.frozen.axis is None else self.frozen.axis
        return torch.ops.mq.dequantize(self.weight, self.weight_scale, self.weight_zero_point, axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(self.layer, {"weight": self.dequantized_weight()}, (x,))
        return y if self.act is None else self.act(y)


def uncalibrated(qmodel: nn.Module) -> list[str]:
    return [name for name, fq in quantizers(qmodel).items() if not fq.is_calibrated]


def _set(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, child = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class _Unique(Exception):
    """An fx node argument that no fingerprint can compare (a tensor constant, an object): the node is unique."""


_CONSTANTS = (bool, int, float, complex, str, type(None), type(Ellipsis), slice, torch.dtype, torch.device,
              torch.layout, torch.memory_format)


def _fingerprint(value: Any, ids: dict[fx.Node, int]) -> Any:
    """A hashable description of an fx argument: nodes by the id of the value they compute, constants by repr."""
    if isinstance(value, fx.Node):
        return ids[value]
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_fingerprint(v, ids) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((repr(k), _fingerprint(v, ids)) for k, v in value.items()))
    if isinstance(value, _CONSTANTS):
        return type(value).__name__, repr(value)
    raise _Unique


def _module_identity(gm: fx.GraphModule, target: str) -> Any:
    """What a call_module computes: a frozen quantizer by its grid and qparams, a torch.nn module without state
    (pooling, activations) by its configuration, any other module by its own name."""
    module = gm.get_submodule(target)
    if isinstance(module, DeployQuantizer):
        f = module.frozen
        return "quantize", repr(f.scheme), f.axis, tuple(f.scale.flatten().tolist()), tuple(
            f.zero_point.flatten().tolist())
    stateless = next(iter(module.parameters()), None) is None and next(iter(module.buffers()), None) is None
    if stateless and type(module).__module__.startswith("torch.nn."):
        return "module", type(module).__qualname__, repr(module)
    return "module", target


def _is_unique(node: fx.Node) -> bool:
    """Nodes never merged: inputs, attributes, outputs, random or side-effecting ops, in-place ops."""
    if node.op not in ("call_function", "call_method", "call_module") or node.is_impure():
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") or node.kwargs.get("inplace") is True


def _drop_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and then every producer of it that is left without users (the duplicate's own chain)."""
    pending = [node]
    while pending:
        current = pending.pop()
        if current.users or current.op in ("placeholder", "get_attr", "output") or current.is_impure():
            continue
        inputs = [n for n in current.all_input_nodes]
        gm.graph.erase_node(current)
        if current.op == "call_module" and isinstance(gm.get_submodule(current.target), DeployQuantizer):
            gm.delete_submodule(current.target)
        pending.extend(inputs)


def share_duplicates(model: nn.Module) -> dict[str, str]:
    """Compute once each quantized tensor that ``model`` (a deploy view) computes twice: the same ops on the same
    inputs, quantized with the same qparams (see the module docstring). Returns ``{dropped tensor: kept tensor}``.
    """
    shared: dict[str, str] = {}
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        ids: dict[fx.Node, int] = {}
        first: dict[Any, fx.Node] = {}
        for node in list(gm.graph.nodes):
            try:
                if _is_unique(node):
                    raise _Unique
                ident = _module_identity(gm, node.target) if node.op == "call_module" else (node.op, node.target)
                key = (ident, _fingerprint(node.args, ids), _fingerprint(node.kwargs, ids))
            except _Unique:
                ids[node] = len(ids)
                continue
            kept = first.setdefault(key, node)
            ids[node] = ids[kept] if kept is not node else len(ids)
            if kept is not node and ident[0] == "quantize":
                dropped, survivor = gm.get_submodule(node.target), gm.get_submodule(kept.target)
                shared[dropped.tensor] = survivor.tensor
                node.replace_all_uses_with(kept)
                _drop_unused(gm, node)
        gm.recompile()
    for dropped, kept in shared.items():
        log.debug("quantized tensor %s is the same op on the same input as %s, with the same qparams: it is "
                 "exported once, as %s", dropped, kept, kept)
    return shared


def deploy_view(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` in eval mode with every quantizer frozen (see the module docstring). Its
    ``mq_shared_tensors`` maps each quantized tensor computed only once to the tensor that stands for it."""
    missing = uncalibrated(qmodel)
    if missing:
        raise ExportError(
            f"cannot export before calibration: {len(missing)} quantizer(s) have no qparams ({shorten(missing)}). Run "
            "mq.calibrate(qmodel, data) first."
        )
    model = copy.deepcopy(qmodel).eval()
    integer_sim.switch_off(model)  # the export holds the float ops the runtime fuses, never the simulation's
    layers = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight_fake_quant", None),
                                                                      FakeQuantizer)]
    for name, qat in layers:
        enabled = bool(qat.weight_fake_quant.quant_enabled.item())
        _set(model, name, DeployLayer(qat) if enabled else qat.to_float())
    for name, fq in list(quantizers(model, weights=False).items()):
        if fq.quant_enabled.item():
            _set(model, name, DeployQuantizer(fq, fq.tensor))
        else:
            _set(model, name, nn.Identity())
    model.mq_shared_tensors = share_duplicates(model)
    return model
