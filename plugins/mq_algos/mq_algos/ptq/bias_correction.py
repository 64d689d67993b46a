"""Bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.3).

Quantizing weights (and the activations before a layer) shifts the mean of the layer's output:
``E[W_q x_q] - E[W x]`` per output channel is not zero, and a shifted mean survives every later layer; it is the
main error of depthwise networks at 8 bits. Subtracting it from the bias removes it.

``mode="empirical"`` (the default) measures it on the calibration data, streamed: one pass of the float model
(every quantizer off) sums ``W x + b`` per output channel of each layer's pre-activation; then one pass of the
quantized model per layer, in the order the layers run, sums that layer's pre-activation (the pass stops at the
layer) and corrects its bias by the difference of the means, so every layer's correction already sees the
corrected layers before it (as AIMET's empirical bias correction does). Only per-channel float64 sums and counts
are kept, never a batch or an activation beyond the current one: memory does not grow with the data, and the cost
is about ``1 + L / 2`` forward passes over the data for ``L`` layers. Under ``torch.distributed`` (``data.group``)
the sums and counts are all-reduced, so every rank applies the corrections of the union of the shards.

``mode="analytic"`` needs no data: ``E[(W_q - W) x]`` with ``E[x]`` from the BatchNorm before the layer, the
pre-activation taken as ``N(beta, gamma^2)`` per channel and pushed through the ReLU/ReLU6 in closed form. It
corrects weight quantization only, and only layers whose input comes from a layer whose BatchNorm is still
there: a model prepared in ``qat`` mode. ``prepare`` folds BatchNorm in ``ptq`` mode, after which its statistics
are gone and the empirical mode is the one that applies.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import fx, nn
from tqdm.auto import tqdm

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
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """Options of bias correction.

    Attributes:
        mode: ``"empirical"`` (calibration data) or ``"analytic"`` (BatchNorm statistics; a ``qat``-mode model).
    """

    mode: str = "empirical"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("empirical", "analytic"))


class _ChannelSums:
    """Running per-output-channel sums of a layer's pre-activation (float64) and how many values each channel saw:
    a mean over the whole data set that holds no batch."""

    def __init__(self, layer: nn.Module) -> None:
        bias = _bias(layer)
        self.sums = torch.zeros(bias.numel(), dtype=torch.float64, device=bias.device)
        self.count = torch.zeros(1, dtype=torch.float64, device=bias.device)
        self.axis = -1 if isinstance(layer, nn.Linear) else 1  # a Linear's channels are last: [N, ..., C]

    def add(self, t: torch.Tensor) -> None:
        values = t.detach().movedim(self.axis, 0).flatten(1).double()
        self.sums += values.sum(1)
        self.count += values.shape[1]

    def mean(self, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The mean over every value seen, on every rank of ``group`` when there is one."""
        sums, count = (self.sums, self.count) if group is None else all_reduce(
            [self.sums, self.count], dist.ReduceOp.SUM, group)
        return sums / count.clamp_min(1)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The weight layers whose output shift can be corrected: quantized weights and a bias (folded or not)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, QATModule) or not module.weight_fake_quant.quant_enabled.item():
            continue
        if _bias(module) is None:
            log.info("bias_correction: %s has no bias to correct; left as it is", name)
            continue
        found[name] = module
    return found


def _shift_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Lower the deploy bias by ``delta``."""
    with torch.no_grad():
        target = _bias(module)
        target.sub_(delta.to(target.dtype))


def _preactivation_hook(module: nn.Module, record: Callable[[torch.Tensor], None]) -> Any:
    """Call ``record`` with the layer's pre-activation (the input of its ReLU, or its output when it has none)."""
    if module.act is not None:
        return module.act.register_forward_pre_hook(lambda _m, args: record(args[0]))
    return module.register_forward_hook(lambda _m, _args, out: record(out))


class _Reached(Exception):
    """Stops a forward pass once the layer being corrected has been measured: the rest of the model is not needed."""


def _float_pass(fp: nn.Module, layers: dict[str, nn.Module], data: CalibrationData
                ) -> tuple[dict[str, _ChannelSums], list[str]]:
    """One pass of the float model: each layer's pre-activation sums, and the layers that run exactly once per
    forward, in the order they run."""
    modules = dict(fp.named_modules())
    sums = {name: _ChannelSums(layer) for name, layer in layers.items()}
    calls: dict[str, int] = {}
    order: list[str] = []

    def record(name: str) -> Callable[[torch.Tensor], None]:
        def hook(value: torch.Tensor) -> None:
            sums[name].add(value)
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
        return hook

    batches = run_hooked(fp, data, [_preactivation_hook(modules[name], record(name)) for name in layers])
    once = torch.tensor([calls.get(name, 0) == batches for name in layers], dtype=torch.int32)
    if data.group is not None:  # a layer is corrected on every rank or on none (the passes are collectives)
        once = all_reduce([once], dist.ReduceOp.MIN, data.group)[0]
    usable = {name for name, ok in zip(layers, once.tolist()) if ok}
    shared = sorted(set(layers) - usable)
    if shared:
        log.info("bias_correction: %s run more (or less) than once per forward; left as they are", ", ".join(shared))
    return sums, [name for name in order if name in usable]


def _quantized_mean(qmodel: nn.Module, layer: nn.Module, data: CalibrationData) -> torch.Tensor:
    """One pass of the quantized model, stopped at ``layer``: the mean of its pre-activation per channel."""
    sums = _ChannelSums(layer)

    def record(value: torch.Tensor) -> None:
        sums.add(value)
        raise _Reached

    run_hooked(qmodel, data, [_preactivation_hook(layer, record)], stop=(_Reached,))
    return sums.mean(data.group)


def _bias(module: nn.Module) -> torch.Tensor:
    """The deploy bias a correction moves: a kept BatchNorm's beta moves it one for one."""
    return module.bn.bias if isinstance(module, QATBnModule) else module.bias


def empirical(qmodel: nn.Module, data: CalibrationData, progress: bool = False) -> int:
    """Correct every layer's mean output shift on the data, in the order the layers run; returns the number
    corrected."""
    layers = _layers(qmodel)
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    fp.eval()
    float_sums, order = _float_pass(fp, layers, data)
    del fp
    training = qmodel.training
    qmodel.eval()
    try:
        for name in tqdm(order, desc="bias_correction", unit="layer", disable=not progress, leave=False):
            delta = _quantized_mean(qmodel, layers[name], data) - float_sums[name].mean(data.group)
            _shift_bias(layers[name], delta)
    finally:
        qmodel.train(training)
    return len(order)


def _normal_pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _relu_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E[max(z, 0)]`` for ``z ~ N(mu, sigma^2)``."""
    sigma = sigma.clamp_min(1e-12)
    return mu * _normal_cdf(mu / sigma) + sigma * _normal_pdf(mu / sigma)


def expected_output(layer: nn.Module) -> torch.Tensor:
    """``E[act(bn(.))]`` per channel of a layer with a kept BatchNorm: ``N(beta, gamma^2)`` through its act."""
    bn = layer.bn
    mu = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    sigma = (bn.weight.detach().double().abs() if bn.weight is not None
             else torch.ones_like(bn.running_mean, dtype=torch.float64))
    if layer.act is None:
        return mu
    mean = _relu_mean(mu, sigma)
    if isinstance(layer.act, nn.ReLU6):
        mean = mean - _relu_mean(mu - 6.0, sigma)
    return mean


def _source_layer(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The QAT layer with a kept BatchNorm whose output reaches ``node``'s input through quantizers only."""
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node) and current.op == "call_module":
        module = modules[str(current.target)]
        if isinstance(module, FakeQuantizer):
            current = current.args[0] if current.args else None
            continue
        if isinstance(module, QATBnModule) and (module.act is None or isinstance(module.act, nn.ReLU | nn.ReLU6)):
            return module
        return None
    return None


def analytic(qmodel: nn.Module) -> int:
    """Correct weight-quantization shifts from BatchNorm statistics; returns the number of layers corrected."""
    if not isinstance(qmodel, fx.GraphModule):
        raise ConfigError("analytic bias correction follows the traced graph to each layer's BatchNorm; this model "
                          "was prepared per sub-module. Prepare the whole model, or use mode=empirical.")
    modules = dict(qmodel.named_modules())
    layers = _layers(qmodel)
    corrected = 0
    with torch.no_grad():
        for node in qmodel.graph.nodes:
            layer = layers.get(str(node.target)) if node.op == "call_module" else None
            source = _source_layer(node, modules) if layer is not None else None
            groups = getattr(layer, "groups", 1)
            if source is None or groups not in (1, layer.weight.shape[0]):
                continue
            weight, _ = layer.deploy_weight_and_bias()
            error = (layer.weight_fake_quant(weight) - weight).double()
            error = error.reshape(error.shape[0], error.shape[1], -1).sum(2)  # [out, in/groups], kernel summed
            mean_in = expected_output(source)
            delta = (error * mean_in).sum(1) if groups == 1 else error[:, 0] * mean_in
            _shift_bias(layer, delta)
            corrected += 1
    if not corrected:
        raise ConfigError(
            "analytic bias correction found no layer fed by a layer whose BatchNorm statistics are still there. "
            "prepare folds BatchNorm in ptq mode, after which they are gone: use mode=empirical (the default), which "
            "measures the same shift on the calibration data, or prepare in qat mode."
        )
    return corrected


class BiasCorrection(PTQMethod):
    """Remove the mean output shift quantization puts into each layer, empirically (calibration data) or
    analytically (BatchNorm statistics)."""

    name: ClassVar[str] = "bias_correction"
    description: ClassVar[str] = "Bias correction: remove quantization's mean output shift (Nagel et al. 2019)."
    Config = BiasCorrectionConfig

    def apply(self, qmodel: nn.Module, data: CalibrationData, config: Any, progress: bool) -> None:
        count = empirical(qmodel, data, progress) if config.mode == "empirical" else analytic(qmodel)
        log.info("bias_correction (%s): %d layer(s) corrected", config.mode, count)
