"""BatchNorm folding: the one place that turns (layer, BN) into the deploy layer's weight and bias.

Folding and the QAT BatchNorm modules (``mq_core.nn.qat``) both call ``fold_weight`` / ``fold_bias``, so a QAT
model in eval mode and its folded deploy model run the very same float arithmetic, bit for bit.

``fold_bn`` accepts torch's BatchNorm modules and "frozen BN" modules (torchvision's ``FrozenBatchNorm2d`` and
look-alikes): any module with ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``eps``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mq_core.errors import MQError

#: The float layers a BatchNorm can be folded into (exact types: a subclass may override ``forward``).
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Linear,
)

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)


class FusionError(MQError, ValueError):
    """A layer/BatchNorm/activation combination that cannot be fused or folded."""


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, as torchvision's (detection backbones use it).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``; all four are buffers, so nothing is
    trained and there is no ``momentum``: that absence is how folding and QAT recognise a frozen BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any):  # type: ignore[override]
        # A BatchNorm2d checkpoint carries num_batches_tracked; drop it so it loads here (as torchvision does).
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` looks like a BatchNorm that can be folded (torch's or a frozen one)."""
    return all(hasattr(module, name) for name in ("weight", "bias", "running_mean", "running_var", "eps"))


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm without ``momentum`` never updates its statistics (torchvision's ``FrozenBatchNorm2d``)."""
    return is_batch_norm(module) and not hasattr(module, "momentum")


def torch_layer_type(layer: nn.Module) -> type[nn.Module]:
    """The torch layer type ``layer`` is (or derives from, for QAT modules) among ``LAYER_TYPES``."""
    for layer_type in LAYER_TYPES:
        if isinstance(layer, layer_type):
            return layer_type
    names = ", ".join(t.__name__ for t in LAYER_TYPES)
    raise FusionError(f"cannot fold into a {type(layer).__name__}; supported layers: {names}.")


def out_channels(layer: nn.Module) -> int:
    """Number of output channels (features) of a supported layer."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def check_layer(layer: nn.Module) -> None:
    """Raise ``FusionError`` unless ``layer``'s type is exactly one of ``LAYER_TYPES``.

    Subclasses are refused because they may override ``forward()`` (dynamic padding, weight standardisation),
    which the fused or folded replacement would silently drop.
    """
    if type(layer) not in LAYER_TYPES:
        names = ", ".join(t.__name__ for t in LAYER_TYPES)
        raise FusionError(f"cannot fuse a {type(layer).__name__}; supported layers (exact types): {names}.")


def check_bn(layer: nn.Module, bn: nn.Module) -> None:
    """Raise ``FusionError`` unless ``bn`` is a BatchNorm with running statistics over ``layer``'s outputs."""
    if not is_batch_norm(bn):
        raise FusionError(
            f"{type(bn).__name__} is not a BatchNorm: folding needs weight, bias, running_mean, running_var, eps."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise FusionError(
            f"{type(bn).__name__} was built with track_running_stats=False; it has no running statistics to fold."
        )
    channels = out_channels(layer)
    if bn.running_mean.numel() != channels:
        raise FusionError(
            f"cannot fuse {type(layer).__name__} with {channels} output channels and {type(bn).__name__} with "
            f"{bn.running_mean.numel()} features: the BatchNorm must normalise the layer's output channels."
        )


def bn_scale_factor(bn: nn.Module) -> torch.Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)`` (``gamma = 1`` when the BN is not affine)."""
    var = bn.running_var
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def channel_view(values: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Reshape a per-output-channel vector so that it broadcasts against ``layer.weight``.

    Conv/Linear weights are ``[out, ...]``. A ConvTranspose weight is ``[in, out/groups, k...]`` and output
    channel ``c = g * (out/groups) + j`` is ``weight[g*in/groups:(g+1)*in/groups, j]``, so with groups > 1 no
    single axis holds the output channels and the vector is expanded to ``[in, out/groups, 1...]``.
    """
    weight = layer.weight
    trailing = [1] * (weight.dim() - 2)
    if not isinstance(layer, _TRANSPOSED):
        return values.reshape(-1, 1, *trailing)
    groups = layer.groups
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    expanded = values.reshape(groups, 1, out_per_group).expand(groups, in_per_group, out_per_group)
    return expanded.reshape(weight.shape[0], out_per_group, *trailing)


def fold_weight(weight: torch.Tensor, layer: nn.Module, factor: torch.Tensor) -> torch.Tensor:
    """``weight * factor`` per output channel of ``layer`` (``factor`` from ``bn_scale_factor``)."""
    return (weight * channel_view(factor, layer)).to(weight.dtype)


def fold_bias(bn: nn.Module, bias: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    """``beta + (bias - running_mean) * factor`` (``beta = 0`` when not affine, ``bias = 0`` when absent)."""
    centred = -bn.running_mean if bias is None else bias - bn.running_mean
    folded = centred * factor
    if bn.bias is not None:
        folded = bn.bias + folded
    return folded.to(bias.dtype if bias is not None else factor.dtype)


def _init_kwargs(layer: nn.Module, layer_type: type[nn.Module], bias: bool) -> dict[str, Any]:
    common = {"bias": bias, "device": "meta", "dtype": layer.weight.dtype}
    if layer_type is nn.Linear:
        return {"in_features": layer.in_features, "out_features": layer.out_features, **common}
    conv = {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "padding_mode": layer.padding_mode,
        **common,
    }
    if layer_type in _TRANSPOSED:
        conv["output_padding"] = layer.output_padding
    return conv


def layer_init_kwargs(layer: nn.Module, bias: bool) -> dict[str, Any]:
    """Constructor arguments that rebuild ``layer``'s torch type on the meta device (no init, no RNG use)."""
    return _init_kwargs(layer, torch_layer_type(layer), bias)


def _parameter(value: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=requires_grad)


def float_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new plain torch layer with ``layer``'s hyper-parameters, training flag and requires_grad, and the given
    weight and bias (copied, so the result shares no storage with ``layer``)."""
    layer_type = torch_layer_type(layer)
    new = layer_type(**_init_kwargs(layer, layer_type, bias is not None))
    new.weight = _parameter(weight, layer.weight.requires_grad)
    if bias is not None:
        bias_grad = layer.bias.requires_grad if layer.bias is not None else layer.weight.requires_grad
        new.bias = _parameter(bias, bias_grad)
    return new.train(layer.training)


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new float layer equal to ``bn(layer(x))`` with ``bn`` in eval mode; it always has a bias.

    Raises ``FusionError`` (a ``ValueError``) for unsupported layers, non-BN modules, BNs without running
    statistics, or mismatched channel counts.
    """
    check_layer(layer)
    check_bn(layer, bn)
    with torch.no_grad():
        factor = bn_scale_factor(bn)
        return float_layer(layer, fold_weight(layer.weight, layer, factor), fold_bias(bn, layer.bias, factor))
