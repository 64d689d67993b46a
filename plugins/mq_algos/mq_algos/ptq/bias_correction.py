"""Bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.3).

Quantizing weights (and the activations before a layer) shifts the mean of the layer's output:
``E[W_q x_q] - E[W x]`` per output channel is not zero, and a shifted mean survives every later layer; it is the
main error of depthwise networks at 8 bits. Subtracting it from the bias removes it.

``mode="empirical"`` (the default) measures it on the calibration data: the float model (every quantizer off)
gives ``E[W x + b]`` per output channel of each layer's pre-activation; then one pass of the quantized model over
the whole data set corrects each layer in graph order as the pass reaches it, so every layer's correction already
sees the corrected layers before it (as AIMET's empirical bias correction does). That pass holds the data set's
activations at once: a few dozen images is enough and keeps the memory small.

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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from mq_core.plugin_api import (
    ConfigError,
    FakeQuantizer,
    PTQMethod,
    QATBnModule,
    QATModule,
    check_choice,
    disable_all,
    model_inputs,
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


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.detach().transpose(0, 1).flatten(1).double().mean(1)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The weight layers whose output shift can be corrected: quantized weights and a bias (folded or not)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, QATModule) or not module.weight_fake_quant.quant_enabled.item():
            continue
        bias = module.bn.bias if isinstance(module, QATBnModule) else module.bias
        if bias is None:
            log.info("bias_correction: %s has no bias to correct; left as it is", name)
            continue
        found[name] = module
    return found


def _shift_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Lower the deploy bias by ``delta``: a kept BatchNorm's beta moves it one for one."""
    target = module.bn.bias if isinstance(module, QATBnModule) else module.bias
    target.sub_(delta.to(target.dtype))


def _whole_data(model: nn.Module, batches: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """All batches as one call's inputs: tensors concatenated along the batch dimension."""
    calls = [model_inputs(model, batch) for batch in batches]

    def join(values: list[Any], where: str) -> Any:
        if all(isinstance(v, torch.Tensor) for v in values):
            return torch.cat(values, 0)
        if all(v == values[0] for v in values):
            return values[0]
        raise ConfigError(f"bias_correction runs the whole calibration set at once, but input {where} is not a "
                          "tensor and differs between batches; pass tensor inputs.")

    args = tuple(join([c[0][i] for c in calls], str(i)) for i in range(len(calls[0][0])))
    kwargs = {k: join([c[1][k] for c in calls], k) for k in calls[0][1]}
    return args, kwargs


def _preactivation_hook(module: nn.Module, store: dict[str, torch.Tensor], name: str) -> Any:
    """Record the layer's pre-activation (the input of its ReLU, or its output when it has none)."""
    if module.act is not None:
        return module.act.register_forward_pre_hook(lambda _m, args: store.__setitem__(name, args[0]))
    return module.register_forward_hook(lambda _m, _args, out: store.__setitem__(name, out))


def empirical(qmodel: nn.Module, batches: list[Any]) -> int:
    """Correct every layer's mean output shift on the data, in graph order; returns the number corrected."""
    layers = _layers(qmodel)
    calls = {name: 0 for name in layers}
    args, kwargs = _whole_data(qmodel, batches)
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    fp.eval()
    float_means: dict[str, torch.Tensor] = {}
    store: dict[str, torch.Tensor] = {}
    fp_layers = dict(fp.named_modules())
    handles = [_preactivation_hook(fp_layers[name], store, name) for name in layers]

    def count(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, _out: Any) -> None:
            calls[name] += 1
        return hook

    handles += [fp_layers[name].register_forward_hook(count(name)) for name in layers]
    try:
        with torch.no_grad():
            fp(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, value in store.items():
        float_means[name] = _channel_mean(value)
    shared = sorted(name for name, n in calls.items() if n != 1)
    if shared:
        log.info("bias_correction: %s run more (or less) than once per forward; left as they are", ", ".join(shared))

    corrected = []
    store.clear()

    def correct(name: str) -> Any:
        def hook(module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            pre = store.pop(name)
            delta = _channel_mean(pre) - float_means[name]
            _shift_bias(module, delta)
            corrected.append(name)
            view = delta.to(pre.dtype).reshape(1, -1, *[1] * (pre.dim() - 2))
            return module.act(pre - view) if module.act is not None else out - view
        return hook

    usable = [name for name in layers if calls[name] == 1 and name in float_means]
    handles = []
    for name in usable:
        handles.append(_preactivation_hook(layers[name], store, name))
        handles.append(layers[name].register_forward_hook(correct(name)))
    training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            qmodel(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        qmodel.train(training)
    return len(corrected)


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

    def apply(self, qmodel: nn.Module, data: list[Any], config: Any, progress: bool) -> None:
        count = empirical(qmodel, data) if config.mode == "empirical" else analytic(qmodel)
        log.info("bias_correction (%s): %d layer(s) corrected", config.mode, count)
