"""The standard fusion patterns: Conv/ConvTranspose/Linear [-> BatchNorm] [-> ReLU/ReLU6].

Registered by the core through ``register_fusion_patterns``. BatchNorm steps accept torch's BatchNorm of the
layer's dimensionality and frozen BatchNorms (no ``momentum``, e.g. torchvision's FrozenBatchNorm2d), which are
folded even in QAT mode because they never train.
"""

from __future__ import annotations

from torch import nn

from mq_core.graph.fusion import FUNCTIONAL_ACTIVATIONS, FusionPattern, ModulePredicate
from mq_core.nn.bn_fold import is_frozen_batch_norm
from mq_core.nn.fused import fuse_modules

FROZEN_BN = ModulePredicate("frozen BatchNorm (no momentum)", is_frozen_batch_norm)
ACTIVATION_STEP = (nn.ReLU, nn.ReLU6, *FUNCTIONAL_ACTIVATIONS)

_LAYERS: tuple[tuple[str, type[nn.Module], type[nn.Module]], ...] = (
    ("conv1d", nn.Conv1d, nn.BatchNorm1d),
    ("conv2d", nn.Conv2d, nn.BatchNorm2d),
    ("conv3d", nn.Conv3d, nn.BatchNorm3d),
    ("conv_transpose1d", nn.ConvTranspose1d, nn.BatchNorm1d),
    ("conv_transpose2d", nn.ConvTranspose2d, nn.BatchNorm2d),
    ("linear", nn.Linear, nn.BatchNorm1d),
)


def _fuse_layer_bn_act(modules: list[nn.Module], mode: str) -> nn.Module:
    layer, rest = modules[0], modules[1:]
    bn = next((m for m in rest if is_frozen_batch_norm(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    act = next((m for m in rest if isinstance(m, (nn.ReLU, nn.ReLU6))), None)
    fold = mode == "ptq" or (bn is not None and is_frozen_batch_norm(bn))
    return fuse_modules(layer, bn, act, fold=fold)


def standard_patterns() -> list[FusionPattern]:
    patterns = []
    for name, layer, bn in _LAYERS:
        bn_step = (bn, FROZEN_BN)
        for suffix, sequence in (
            ("bn_relu", ((layer,), bn_step, ACTIVATION_STEP)),
            ("bn", ((layer,), bn_step)),
            ("relu", ((layer,), ACTIVATION_STEP)),
        ):
            patterns.append(FusionPattern(f"{name}_{suffix}", sequence, _fuse_layer_bn_act,
                                          f"{layer.__name__} + {suffix.replace('_', ' + ')}"))
    return patterns
