"""Float fused containers (layer -> BatchNorm -> activation) that the fusion pass creates.

They are ``nn.Sequential`` subclasses, so a fused float model still runs as float; their type tells ``prepare``
which QAT module to build (``mq_core.nn.qat.QAT_MODULES``). Names follow torch's intrinsics (``ConvBnReLU2d`` ...).
The activation slot holds ``nn.ReLU`` or ``nn.ReLU6``: both clamp at 0 and fold into a conv's output range the
same way on every target, so one set of containers serves both.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mq_core.graph.ops import module_kind
from mq_core.nn.bn_fold import FusionError, check_bn, check_layer, fold_bn

#: Activations that may follow a fused layer.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


class FusedModule(nn.Sequential):
    """Base of the fused containers: ``layer``, then ``bn`` if ``has_bn``, then ``act`` if ``has_act``."""

    layer_type: ClassVar[type[nn.Module]]
    has_bn: ClassVar[bool]
    has_act: ClassVar[bool]
    #: Tracing keeps a fused container as one node (see mq_core.graph.capture).
    mq_leaf: ClassVar[bool] = True

    def __init__(self, *modules: nn.Module) -> None:
        expected = 1 + self.has_bn + self.has_act
        if len(modules) != expected:
            raise FusionError(f"{type(self).__name__} takes {expected} modules, got {len(modules)}.")
        layer = modules[0]
        bn = modules[1] if self.has_bn else None
        act = modules[-1] if self.has_act else None
        check_fusable(layer, bn, act)
        if type(layer) is not self.layer_type:
            raise FusionError(f"{type(self).__name__} holds a {self.layer_type.__name__}, got {type(layer).__name__}.")
        super().__init__(*modules)

    @property
    def layer(self) -> nn.Module:
        return self[0]

    @property
    def mq_op_kind(self) -> str:
        """A fused container computes what its layer computes (placement treats it as that layer)."""
        return module_kind(self.layer)

    @property
    def bn(self) -> nn.Module | None:
        return self[1] if self.has_bn else None

    @property
    def act(self) -> nn.Module | None:
        return self[-1] if self.has_act else None


#: (layer type, has_bn, has_act) -> container type; filled by ``_fused_type``.
FUSED_MODULES: dict[tuple[type[nn.Module], bool, bool], type[FusedModule]] = {}


def _fused_type(name: str, layer_type: type[nn.Module], bn: bool, act: bool) -> type[FusedModule]:
    parts = [layer_type.__name__] + ["BatchNorm"] * bn + ["ReLU/ReLU6"] * act
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"Float fused container: {' -> '.join(parts)}.",
        "layer_type": layer_type,
        "has_bn": bn,
        "has_act": act,
    }
    fused = type(name, (FusedModule,), namespace)
    FUSED_MODULES[layer_type, bn, act] = fused
    return fused


ConvBn1d = _fused_type("ConvBn1d", nn.Conv1d, bn=True, act=False)
ConvBn2d = _fused_type("ConvBn2d", nn.Conv2d, bn=True, act=False)
ConvBn3d = _fused_type("ConvBn3d", nn.Conv3d, bn=True, act=False)
ConvBnReLU1d = _fused_type("ConvBnReLU1d", nn.Conv1d, bn=True, act=True)
ConvBnReLU2d = _fused_type("ConvBnReLU2d", nn.Conv2d, bn=True, act=True)
ConvBnReLU3d = _fused_type("ConvBnReLU3d", nn.Conv3d, bn=True, act=True)
ConvReLU1d = _fused_type("ConvReLU1d", nn.Conv1d, bn=False, act=True)
ConvReLU2d = _fused_type("ConvReLU2d", nn.Conv2d, bn=False, act=True)
ConvReLU3d = _fused_type("ConvReLU3d", nn.Conv3d, bn=False, act=True)
ConvTransposeBn1d = _fused_type("ConvTransposeBn1d", nn.ConvTranspose1d, bn=True, act=False)
ConvTransposeBn2d = _fused_type("ConvTransposeBn2d", nn.ConvTranspose2d, bn=True, act=False)
ConvTransposeBnReLU1d = _fused_type("ConvTransposeBnReLU1d", nn.ConvTranspose1d, bn=True, act=True)
ConvTransposeBnReLU2d = _fused_type("ConvTransposeBnReLU2d", nn.ConvTranspose2d, bn=True, act=True)
ConvTransposeReLU1d = _fused_type("ConvTransposeReLU1d", nn.ConvTranspose1d, bn=False, act=True)
ConvTransposeReLU2d = _fused_type("ConvTransposeReLU2d", nn.ConvTranspose2d, bn=False, act=True)
LinearBn1d = _fused_type("LinearBn1d", nn.Linear, bn=True, act=False)
LinearBnReLU1d = _fused_type("LinearBnReLU1d", nn.Linear, bn=True, act=True)
LinearReLU = _fused_type("LinearReLU", nn.Linear, bn=False, act=True)


def check_fusable(layer: nn.Module, bn: nn.Module | None, act: nn.Module | None) -> None:
    """Raise ``FusionError`` (a ``ValueError``) unless ``layer [-> bn] [-> act]`` is a supported fusion."""
    if bn is None and act is None:
        raise FusionError(f"nothing to fuse with {type(layer).__name__}: give a BatchNorm, an activation or both.")
    check_layer(layer)
    if bn is not None:
        check_bn(layer, bn)
    if act is not None and not isinstance(act, ACTIVATION_TYPES):
        raise FusionError(
            f"cannot fuse {type(layer).__name__} with {type(act).__name__}: only ReLU and ReLU6 are fused."
        )


def unpack_fused(module: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """``(layer, bn, act)`` of a fused container, or ``(module, None, None)`` for a plain layer."""
    if isinstance(module, FusedModule):
        return module.layer, module.bn, module.act
    return module, None, None


def fuse_modules(
    layer: nn.Module, bn: nn.Module | None = None, act: nn.Module | None = None, *, fold: bool
) -> nn.Module:
    """Fuse ``layer [-> bn] [-> act]``.

    ``fold=True`` (PTQ): the BN is folded now; returns the folded layer, or a ``<L>ReLU`` container of it and
    ``act``. ``fold=False`` (QAT): returns the ``<L>Bn`` / ``<L>BnReLU`` / ``<L>ReLU`` container so that the QAT
    module can keep training the BN. The given modules are reused, not copied (folding builds a new layer).
    """
    check_fusable(layer, bn, act)
    if fold and bn is not None:
        layer, bn = fold_bn(layer, bn), None
        if act is None:
            return layer
    container = FUSED_MODULES[type(layer), bn is not None, act is not None]
    return container(*(m for m in (layer, bn, act) if m is not None))
