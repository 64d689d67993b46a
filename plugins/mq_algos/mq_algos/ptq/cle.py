"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, "Data-Free Quantization", section 4).

Two convolutions in a row, ``y = W2 f(W1 x + b1) + b2`` with ``f`` ReLU (or nothing), compute the same function
after scaling output channel ``i`` of the first by ``1 / s_i`` and input channel ``i`` of the second by ``s_i``,
because ``f(z / s) = f(z) / s`` for ``s > 0``. With ``r1_i`` the range of the first layer's channel ``i`` and
``r2_i`` the range of the second's input channel ``i``, ``s_i = sqrt(r1_i / r2_i)`` makes both ranges
``sqrt(r1_i * r2_i)``: a per-tensor (or per-channel) weight grid then wastes far fewer levels on a few wide
channels, which is what breaks depthwise networks at 8 bits. Chains (expand -> depthwise -> project) are
equalized pair by pair, repeatedly, until the scales stop moving.

High-bias absorption (section 4.2): after equalization, channels with large biases dominate the next activation
range. Where the first layer ends in a ReLU/ReLU6 and the second has no padding, ``c_i = max(0, min_i)`` of the
first layer's pre-activation moves
from ``b1`` into ``b2 += W2 c``, exact wherever the pre-activation stays above ``c_i``. The paper takes
``c = max(0, beta - 3 gamma)`` from BatchNorm, assuming Gaussian pre-activations; ``prepare`` has folded BatchNorm by
now, and on EfficientNet-Lite0 its data equivalent (mean - 3 std) changed the float prediction of 1 of 8 photo
crops, so mq uses the minimum measured on the calibration data, which keeps the float function exact wherever the
data reaches.

It runs on the float weights with BatchNorm folded, before calibration: the ``"float"`` stage of ``mq.ptq``,
which calibrates again after it.

ReLU6 is not positively homogeneous (``min(z / s, 6) != min(z, 6) / s`` where ``z`` reaches 6). The paper and
AIMET replace it by ReLU, which on EfficientNet-Lite0 (trained with ReLU6 clipping for real) kept the float
top-1 prediction of 1 of 8 photo crops, before any quantization. mq keeps the ReLU6 and bounds the scales
instead (``relu6="bounded"``): a channel whose pre-activation reaches 6 on the calibration data keeps scale 1; any
other channel may be scaled, but never so far that its largest value on the data passes 6. Where the data
reaches, the float function is then exactly the original; ``"skip"`` leaves pairs through ReLU6 alone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
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
    check_choice,
    disable_all,
    prepare_info,
)

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Modules between two layers that commute with a positive per-channel scale (zero padding, identity, dropout).
_PASS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.Identity, nn.Dropout)
#: ReLU6's upper clip.
RELU6_TOP = 6.0


@dataclass(frozen=True)
class CLEConfig:
    """Options of cross-layer equalization.

    Attributes:
        iterations: passes over all pairs at most; chains converge in a few (the loop stops once no scale moves by
            more than ``tolerance``).
        tolerance: relative change of the scales below which equalization stops.
        relu6: ``"bounded"`` (pairs through ReLU6 are equalized with scales bounded so that no channel's clipping
            changes on the calibration data) or ``"skip"`` (pairs through ReLU6 are left alone).
        absorb_bias: absorb high biases into the next layer where that is exact enough (ReLU, no padding).
    """

    iterations: int = 20
    tolerance: float = 1e-4
    relu6: str = "bounded"
    absorb_bias: bool = True

    def __post_init__(self) -> None:
        check_choice("relu6", self.relu6, ("bounded", "skip"))
        if self.iterations < 1 or self.tolerance <= 0:
            raise ConfigError("cle: iterations must be at least 1 and tolerance positive.")


@dataclass
class Pair:
    """Two layers with a per-channel path between them: ``first``'s output channel i feeds ``second``'s input
    channel i, through activation quantizers and zero padding only (``padded``: some padding on the way)."""

    first_name: str
    second_name: str
    first: nn.Module
    second: nn.Module
    padded: bool


def _equalizable(module: nn.Module | None) -> bool:
    if not isinstance(module, QATModule) or not isinstance(module, _CONVS):
        return False
    return module.act is None or isinstance(module.act, nn.ReLU | nn.ReLU6)


def _second_ok(module: nn.Module) -> bool:
    """A full convolution or a depthwise one: where input channel i's weights are easy to find."""
    return module.groups == 1 or module.groups == module.in_channels == module.out_channels


def find_pairs(gm: fx.GraphModule) -> list[Pair]:
    """The equalizable pairs of a prepared GraphModule, in graph order."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        first = modules.get(str(node.target)) if node.op == "call_module" else None
        if not _equalizable(first):
            continue
        current, padded = node, False
        while len(current.users) == 1:
            user = next(iter(current.users))
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if module is None or not user.args or user.args[0] is not current:
                break
            if isinstance(module, (FakeQuantizer, *_PASS)):
                padded = padded or isinstance(module, _PASS[:3])
                current = user
                continue
            if _equalizable(module) and _second_ok(module):
                padded = padded or any(p != 0 for p in module.padding) or module.padding_mode != "zeros"
                pairs.append(Pair(str(node.target), str(user.target), first, module, padded))
            break
    return pairs


def _first_range(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().abs().flatten(1).amax(1)


def _second_range(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach().abs()
    if layer.groups == 1:
        return weight.transpose(0, 1).flatten(1).amax(1)
    return weight.flatten(1).amax(1)  # depthwise: input channel i is output channel i


def _scale_input_channels(layer: nn.Module, scale: torch.Tensor) -> None:
    shape = [1] * layer.weight.dim()
    if layer.groups == 1:
        shape[1] = -1
    else:
        shape[0] = -1
    layer.weight.mul_(scale.reshape(shape))


@dataclass
class _Stats:
    """Per-channel extremes of a first layer's pre-activation on the data, in its original (unscaled) units."""

    bottom: torch.Tensor
    top: torch.Tensor


def _statistics(gm: fx.GraphModule, names: list[str], data: CalibrationData) -> dict[str, _Stats]:
    """Min and max per channel of the named layers' pre-activations (the input of their act), in float, over the
    data (streamed; merged over ``data.group``'s ranks, so every rank equalizes alike)."""
    model = copy.deepcopy(gm)
    disable_all(model)
    model.eval()
    extremes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        weight = model.get_submodule(name).weight
        extremes[name] = (torch.full((weight.shape[0],), torch.inf, device=weight.device),
                          torch.full((weight.shape[0],), -torch.inf, device=weight.device))

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0].detach().float().transpose(0, 1).flatten(1)
            low, high = extremes[name]
            extremes[name] = (torch.minimum(low, z.amin(1)), torch.maximum(high, z.amax(1)))
        return record

    run_hooked(model, data, [model.get_submodule(name).act.register_forward_pre_hook(hook(name)) for name in names])
    if data.group is not None:
        lows = all_reduce([low for low, _ in extremes.values()], dist.ReduceOp.MIN, data.group)
        highs = all_reduce([high for _, high in extremes.values()], dist.ReduceOp.MAX, data.group)
        extremes = dict(zip(extremes, zip(lows, highs)))
    # a layer the data never reached (a branch not taken) has no statistics
    return {name: _Stats(low, high) for name, (low, high) in extremes.items() if bool((low <= high).all())}


def _equalize(pair: Pair, applied: torch.Tensor, stats: _Stats | None) -> float:
    """Scale one pair; ``applied`` (the first layer's total scale so far) is updated in place. Returns the largest
    relative change of a scale (0 when already equal)."""
    r1, r2 = _first_range(pair.first), _second_range(pair.second)
    usable = (r1 > 0) & (r2 > 0)
    scale = torch.where(usable, torch.sqrt(r1 / torch.where(usable, r2, torch.ones_like(r2))), torch.ones_like(r1))
    if isinstance(pair.first.act, nn.ReLU6):
        clips = stats.top >= RELU6_TOP
        wanted = torch.maximum(applied * scale, stats.top / RELU6_TOP)  # never scaled up past the clip
        scale = torch.where(clips, torch.ones_like(scale), wanted / applied)
    applied.mul_(scale)
    pair.first.weight.div_(scale.reshape(-1, *[1] * (pair.first.weight.dim() - 1)))
    if pair.first.bias is not None:
        pair.first.bias.div_(scale)
    _scale_input_channels(pair.second, scale)
    return float((scale - 1).abs().max())


def _absorb(pair: Pair, stats: _Stats, applied: torch.Tensor) -> None:
    """Move ``max(0, min)`` (in the equalized units) of each channel from the first bias to the second; through
    ReLU6 only for channels that never reach the clip."""
    shift = (stats.bottom / applied).clamp_min(0)
    if isinstance(pair.first.act, nn.ReLU6):
        shift = torch.where(stats.top >= RELU6_TOP, torch.zeros_like(shift), shift)
    first, second = pair.first, pair.second
    weight = second.weight.detach()
    if second.groups == 1:
        added = (weight.flatten(2).sum(2) * shift).sum(1)
    else:
        added = weight.flatten(1).sum(1) * shift
    first.bias.sub_(shift)
    second.bias.add_(added)


def equalize(gm: fx.GraphModule, config: CLEConfig, batches: Iterable[Any] | None = None) -> list[Pair]:
    """Equalize (and absorb high biases of) every pair of a prepared model in place; returns the pairs used.

    ``batches``: calibration data (a ``CalibrationData``, or anything ``mq.calibrate`` reads). Without it nothing is
    measured: pairs through ReLU6 are skipped and no bias is absorbed."""
    if batches is not None and not isinstance(batches, CalibrationData):
        batches = CalibrationData(batches)
    pairs = find_pairs(gm)
    if config.relu6 == "skip" or not batches:
        pairs = [p for p in pairs if not isinstance(p.first.act, nn.ReLU6)]
    if not pairs:
        log.warning("cle: no pair of consecutive convolutions to equalize (through ReLU%s or nothing)",
                    "" if config.relu6 == "skip" else "/ReLU6")
        return pairs
    measured = [p.first_name for p in pairs if p.first.act is not None]
    stats = _statistics(gm, measured, batches) if batches and measured else {}
    applied = {p.first_name: torch.ones(p.first.weight.shape[0], device=p.first.weight.device) for p in pairs}
    with torch.no_grad():
        passes, change = 0, float("inf")
        while passes < config.iterations and change >= config.tolerance:
            change = max(_equalize(p, applied[p.first_name], stats.get(p.first_name)) for p in pairs)
            passes += 1
        log.info("cle: %d pair(s) equalized in %d pass(es), last change %.2g", len(pairs), passes, change)
        absorbable = [p for p in pairs if config.absorb_bias and not p.padded and p.first_name in stats
                      and p.first.bias is not None and p.second.bias is not None]
        for pair in absorbable:
            _absorb(pair, stats[pair.first_name], applied[pair.first_name])
        if absorbable:
            log.info("cle: high biases absorbed in %d pair(s)", len(absorbable))
    return pairs


class CLE(PTQMethod):
    """Cross-layer equalization of consecutive convolutions (through ReLU/ReLU6) and high-bias absorption, on the
    float weights before calibration (``mq.ptq`` calibrates again after it)."""

    name: ClassVar[str] = "cle"
    description: ClassVar[str] = "Cross-layer equalization and high-bias absorption (Nagel et al. 2019)."
    stage: ClassVar[str] = "float"
    Config = CLEConfig

    def apply(self, qmodel: nn.Module, data: CalibrationData, config: Any, progress: bool) -> None:
        if not isinstance(qmodel, fx.GraphModule):
            raise ConfigError("cle finds consecutive layers in the traced graph; this model was prepared per "
                              "sub-module (prepare(modules=...)). Prepare the whole model, or the sub-module alone.")
        unfolded = [n for n, m in qmodel.named_modules() if isinstance(m, QATBnModule)]
        if prepare_info(qmodel).mode == "qat" or unfolded:
            raise ConfigError(
                "cle rescales weights with BatchNorm folded into them, but this model keeps its BatchNorms "
                f"({', '.join(unfolded[:3]) or 'mode qat'}). Prepare in ptq mode (mq.prepare(..., mode='ptq')) for cle."
            )
        equalize(qmodel, config, data)
