"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models"): migrate activation outliers into the weights.

Transformer activations have a few input channels (the same ones for every token) whose magnitude is 10-100x the
rest, so a per-tensor activation grid spends its levels on them and rounds the others to a handful of values; the
weights have no such channels. ``Y = X W^T = (X diag(s)^-1) (W diag(s))^T`` for any positive ``s``, and with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over the calibration data, ``max|W_j|`` over the weight's column ``j`` of every Linear that reads
``X``) channel ``j``'s activation range shrinks by ``s_j`` and its weight range grows by it: ``alpha`` sets how much
of the difficulty moves to the weights (0.5 in the paper; larger for models with stronger outliers).

The division by ``s`` must cost nothing at run time, so it is absorbed into the producer of ``X``: a LayerNorm's
weight and bias, or a Linear's output rows and bias (the path between them may pass through fake quantizers,
dropout, ReLU, reshapes/transposes and the right operand of a matmul, e.g. attention's value projection feeding the
output projection). The Linears reading one producer's output (Q/K/V after a LayerNorm) share one ``s``. Absorbing
is exact only where every reader of the producer's output is scaled back: a LayerNorm whose output also feeds a
residual add (post-LN BERT) cannot absorb ``s``, and a non-homogeneous op on the way (GELU) breaks it. Rather than
reasoning about every op, each candidate is tried on a float copy of the model and kept only if the outputs on the
first calibration batch stay equal (relative error below ``EXACT_TOLERANCE``); others are skipped with a debug log.

It runs on the float weights before activation ranges are measured (the ``"float"`` stage, like ``cle``); ``mq.ptq``
calibrates again after it. Activation statistics are streamed: a per-channel running max per Linear input, never
the activations themselves.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import fx, nn

from mq_algos.ptq.passes import run_hooked
from mq_core.plugin_api import (
    CalibrationData,
    ConfigError,
    FakeQuantizer,
    PTQMethod,
    QATBnModule,
    QATModule,
    all_reduce,
    disable_all,
    run_batch,
)

log = logging.getLogger(__name__)

#: Relative L2 error of the float outputs above which an absorption is not exact and is undone.
EXACT_TOLERANCE = 1e-4
#: Smallest smoothing factor (the reference implementation's clamp): keeps a silent channel's weight finite.
MIN_SCALE = 1e-5
#: Ops that carry channel j of their first operand to channel j (last dim) of their output; ReLU because
#: ``relu(x / s) = relu(x) / s`` for ``s > 0``.
_PASS_FUNCTIONS = frozenset({"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "dropout",
                             "clone", "alias", "flatten", "unflatten", "relu"})
#: Ops that carry channel j of their second operand to channel j of their output (``a @ b``).
_RIGHT_OPERAND = frozenset({"matmul", "bmm"})


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Options of SmoothQuant.

    Attributes:
        alpha: migration strength in [0, 1]: 0 leaves activations alone (``s`` only equalizes weights), 1 moves
            all of the activations' range into the weights. 0.5 is the paper's default; 0.75-0.85 for models with
            large outliers.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha!r}.")


@dataclass
class Group:
    """The Linears whose input comes from one producer (sharing one ``s``), and that producer (``None``: none found,
    the group is one Linear)."""

    producer: str | None
    linears: list[str] = field(default_factory=list)


def _name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", "")


def _producer(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The LayerNorm or Linear whose output channels reach ``node``'s channels one to one, or None."""
    while True:
        if node.op == "call_module":
            module = modules[str(node.target)]
            if isinstance(module, nn.LayerNorm):
                return str(node.target) if module.weight is not None and module.bias is not None else None
            if isinstance(module, QATModule) and isinstance(module, nn.Linear):
                return str(node.target)
            if not isinstance(module, FakeQuantizer | nn.Dropout | nn.Identity | nn.ReLU):
                return None
            index = 0
        elif node.op in ("call_function", "call_method"):
            name = _name(node)
            if name in _PASS_FUNCTIONS:
                index = 0
            elif name in _RIGHT_OPERAND:
                index = 1
            else:
                return None
        else:
            return None
        if len(node.args) <= index or not isinstance(node.args[index], fx.Node):
            return None
        node = node.args[index]


def find_groups(gm: fx.GraphModule) -> list[Group]:
    """Linears (weights quantized, no BatchNorm) grouped by the module producing their input, in graph order: all
    readers of one producer share one ``s``. Each Linear without a producer is a group of its own."""
    modules = dict(gm.named_modules())
    groups: dict[str, Group] = {}
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not (isinstance(module, QATModule) and isinstance(module, nn.Linear)) or isinstance(module, QATBnModule):
            continue
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = _producer(node.args[0], modules)
        key = producer if producer is not None else f"\0{node.target}"
        groups.setdefault(key, Group(producer)).linears.append(str(node.target))
    return list(groups.values())


def input_absmax(model: nn.Module, names: list[str], data: CalibrationData) -> dict[str, torch.Tensor]:
    """Per input channel (last dim), the running max of ``|x|`` at each named Linear over the data (streamed; merged
    over ``data.group``'s ranks). ``model`` must compute in float. A Linear the data never reached is left out."""
    running = {name: torch.zeros(model.get_submodule(name).in_features, device=model.get_submodule(name).weight.device)
               for name in names}
    reached: set[str] = set()

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            running[name] = torch.maximum(running[name], x.abs().reshape(-1, x.shape[-1]).amax(0))
            reached.add(name)
        return record

    run_hooked(model, data, [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names])
    if data.group is not None:  # every rank smooths alike: a Linear reached on any rank counts
        merged = all_reduce(list(running.values()), dist.ReduceOp.MAX, data.group)
        seen = all_reduce([torch.tensor([float(n in reached) for n in names])], dist.ReduceOp.MAX, data.group)[0]
        running = dict(zip(running, merged, strict=True))
        reached = {n for n, flag in zip(names, seen.tolist(), strict=True) if flag}
    return {name: value for name, value in running.items() if name in reached}


def factors(linears: list[nn.Module], absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, 1 where a channel never fires or has no weight."""
    weight = torch.stack([m.weight.detach().abs().amax(0) for m in linears]).amax(0)
    usable = (absmax > 0) & (weight > 0)
    scale = absmax.clamp(min=MIN_SCALE).pow(alpha) / weight.clamp(min=MIN_SCALE).pow(1 - alpha)
    return torch.where(usable, scale.clamp(min=MIN_SCALE), torch.ones_like(scale))


def _apply(model: nn.Module, group: Group, scale: torch.Tensor, inverse: bool = False) -> None:
    """Divide the producer's output channels by ``scale`` and multiply the Linears' input columns by it (``inverse``:
    undo)."""
    s = 1 / scale if inverse else scale
    producer = model.get_submodule(group.producer)
    with torch.no_grad():
        if isinstance(producer, nn.LayerNorm):
            producer.weight.div_(s)
            producer.bias.div_(s)
        else:
            producer.weight.div_(s[:, None])
            if producer.bias is not None:
                producer.bias.div_(s)
        for name in group.linears:
            model.get_submodule(name).weight.mul_(s)


def _outputs(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = run_batch(model, batch)
    leaves = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else [out]
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor], group: dist.ProcessGroup | None) -> float:
    """Largest relative L2 error over the outputs, and over the ranks of ``group`` (each probes its own batch, and
    all must decide alike)."""
    error = max(float((g - w).norm() / w.norm().clamp(min=1e-30)) for g, w in zip(got, want, strict=True))
    if group is None:
        return error
    return float(all_reduce([torch.tensor([error])], dist.ReduceOp.MAX, group)[0])


def smooth(gm: fx.GraphModule, config: SmoothQuantConfig, data: CalibrationData) -> dict[str, torch.Tensor]:
    """Smooth every group of a prepared model whose producer absorbs the factors exactly (in place); returns the
    factors applied, by the producer's name."""
    groups = []
    for group in find_groups(gm):
        if group.producer is None:
            log.debug("smoothquant: %s skipped: its input comes from no LayerNorm or Linear", group.linears[0])
        else:
            groups.append(group)
    if not groups:
        log.warning("smoothquant: no Linear reads the output of a LayerNorm or Linear; nothing to smooth")
        return {}
    probe = copy.deepcopy(gm)
    disable_all(probe)
    probe.eval()
    absmax = input_absmax(probe, [n for g in groups for n in g.linears], data)
    first = next(iter(data))  # the exactness probe: read again rather than kept from the pass above
    reference = _outputs(probe, first)
    applied: dict[str, torch.Tensor] = {}
    for group in groups:
        seen = [absmax[n] for n in group.linears if n in absmax]
        if len(seen) != len(group.linears):
            log.debug("smoothquant: %s skipped: not reached by the calibration data", ", ".join(group.linears))
            continue
        scale = factors([probe.get_submodule(n) for n in group.linears], torch.stack(seen).amax(0), config.alpha)
        _apply(probe, group, scale)
        error = _relative_error(_outputs(probe, first), reference, data.group)
        if error > EXACT_TOLERANCE:
            _apply(probe, group, scale, inverse=True)
            log.debug("smoothquant: %s -> %s skipped: absorbing the factors changes the float outputs (relative "
                      "error %.2g); another reader of %s's output is not scaled back", group.producer,
                      ", ".join(group.linears), error, group.producer)
            continue
        _apply(gm, group, scale)
        applied[group.producer] = scale
        log.debug("smoothquant: %s -> %s, factors %.3g..%.3g", group.producer, ", ".join(group.linears),
                  float(scale.min()), float(scale.max()))
    log.info("smoothquant: %d of %d Linear group(s) smoothed (alpha %.2f)", len(applied), len(groups), config.alpha)
    return applied


class SmoothQuant(PTQMethod):
    """SmoothQuant's per-channel migration of activation outliers into Linear weights, absorbed into the producing
    LayerNorm or Linear; on the float weights before calibration (``mq.ptq`` calibrates again after it)."""

    name: ClassVar[str] = "smoothquant"
    description: ClassVar[str] = "Migrate activation outliers into Linear weights (SmoothQuant, Xiao et al. 2023)."
    stage: ClassVar[str] = "float"
    Config = SmoothQuantConfig

    def apply(self, qmodel: nn.Module, data: CalibrationData, config: Any, progress: bool) -> None:
        if not isinstance(qmodel, fx.GraphModule):
            raise ConfigError("smoothquant finds each Linear's producer in the traced graph; this model was "
                              "prepared per sub-module (prepare(modules=...)). Prepare the whole model, or the "
                              "sub-module alone.")
        smooth(qmodel, config, data)
