"""QAT modules: float layers whose weight is fake-quantized, optionally with a BatchNorm folded in simulation.

Each class subclasses the float torch layer (``QConv2d`` is an ``nn.Conv2d``), so ``isinstance`` checks and the
layer's attributes keep working. ``weight_fake_quant`` quantizes the weight the deploy model will carry; ``act``
(ReLU/ReLU6, optional) runs after the layer.

The BatchNorm variants follow Jacob et al. 2018 (torch's ``ConvBn``): while training they quantize ``w * gamma /
sqrt(running_var + eps)``, undo the scale and let the kept BatchNorm normalise with batch statistics (updating its
running statistics with its own momentum). The scale is undone on the quantized weight (per output channel) rather
than on the layer output as torch does: the layer is linear in each output channel's weights, so the result is the
same, but the division touches the small weight instead of the whole activation, which took a ResNet-18 QAT step
from about 1.4x to 1.2-1.3x a float step on a CPU (``benchmarks/qat_step.py``). In eval mode, or once the BN is
frozen, they run the deploy arithmetic itself (``mq_core.nn.bn_fold``), so their output equals the folded model's
bit for bit.

A weight quantizer that normalises its input (``FakeQuantizer.normalizes_input``: DoReFa maps every weight onto
[-1, 1]) cannot take the fold factor before quantizing: the normalisation removes it, the division after puts
``1 / factor`` into the weight, the BN's running variance grows with it and the loop diverges. For such a
quantizer the BN variants quantize the *unfolded* weight and fold after: while training the factor cancels (the
quantized weight feeds the BN directly, as in the DoReFa paper); in eval mode the deploy weight is the quantized
weight times the factor, which lies on the per-channel grid ``scale * |factor|`` (``folded_weight_qparams``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mq_core.errors import SchemeError
from mq_core.nn.bn_fold import (
    LAYER_TYPES,
    bn_scale_factor,
    channel_view,
    check_bn,
    float_layer,
    fold_bias,
    fold_weight,
    is_frozen_batch_norm,
    layer_init_kwargs,
)
from mq_core.nn.fused import FUSED_MODULES, unpack_fused
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import fake_quantize
from mq_core.quant.scheme import SCALE_EPS

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


class QATModule(nn.Module):
    """Base of the QAT layers: a weight fake quantizer and an optional activation.

    Listed after an op mixin and before the torch layer in each class's bases; ``__init__`` takes the torch
    layer's constructor arguments plus ``weight_fake_quant`` and ``act``.
    """

    #: The weight axis holding output channels (what a per-channel weight quantizer must use).
    weight_ch_axis: ClassVar[int] = 0
    #: Tracing keeps a QAT layer as one node (see mq_core.graph.capture).
    mq_leaf: ClassVar[bool] = True

    def __init__(
        self, *args: Any, weight_fake_quant: FakeQuantizer, act: nn.Module | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        axis = weight_fake_quant.ch_axis
        if axis is not None and axis % self.weight.dim() != self.weight_ch_axis:
            raise SchemeError(
                f"{type(self).__name__} needs its per-channel weight quantizer on axis {self.weight_ch_axis} (the "
                f"output channels of a {self.weight.dim()}-d weight), got ch_axis={axis}."
            )
        self.weight_fake_quant = weight_fake_quant
        self.act = act

    @classmethod
    def _extra_init(cls, bn: nn.Module | None) -> dict[str, Any]:
        if bn is not None:
            raise TypeError(f"{cls.__name__} has no BatchNorm; convert a fused container with a BatchNorm variant.")
        return {}

    @classmethod
    def from_float(cls, mod: nn.Module, weight_fake_quant: FakeQuantizer) -> QATModule:
        """Build from a float layer or fused container; parameters are copied (requires_grad, device, dtype
        kept) and BN/activation modules deep-copied, so the float model is never modified by training."""
        layer, bn, act = unpack_fused(mod)
        if type(layer) not in LAYER_TYPES or not issubclass(cls, type(layer)):
            raise TypeError(f"{cls.__name__}.from_float cannot convert a {type(mod).__name__}.")
        weight = layer.weight
        qat = cls(
            **layer_init_kwargs(layer, bias=layer.bias is not None),
            **cls._extra_init(bn),
            weight_fake_quant=weight_fake_quant.to(weight.device),
            act=copy.deepcopy(act),
        )
        qat.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if layer.bias is not None:
            qat.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        return qat.train(mod.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._qat_forward(input)

    def _qat_forward(self, x: torch.Tensor, **op_kwargs: Any) -> torch.Tensor:
        weight, bias = self.deploy_weight_and_bias()
        return self._activate(self._op(x, self.weight_fake_quant(weight), bias, **op_kwargs))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.act is None else self.act(y)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The deploy layer's float weight, which ``weight_fake_quant`` quantizes in eval mode (for a quantizer
        that normalises its input, the fold comes after it: see ``QATBnModule``), and the bias added in eval mode."""
        return self.weight, self.bias

    def to_float(self) -> nn.Module:
        """The deploy float module: the plain layer with the *unquantized* deploy weight (BN folded), followed by
        the activation when there is one. Deploy code quantizes its weight with ``weight_fake_quant``."""
        with torch.no_grad():
            layer = float_layer(self, *self.deploy_weight_and_bias())
        if self.act is None:
            return layer
        return nn.Sequential(layer, copy.deepcopy(self.act)).train(self.training)


class QATBnModule(QATModule):
    """A QAT layer followed by a BatchNorm that is folded in simulation (see the module docstring).

    ``bn_frozen`` is a plain attribute (as in torch's ``ConvBn``): it is not saved in the state dict, so a
    resumed run calls ``freeze_bn`` again from its schedule. A BN without ``momentum`` (``FrozenBatchNorm2d``)
    stays frozen.
    """

    def __init__(
        self,
        *args: Any,
        bn: nn.Module,
        weight_fake_quant: FakeQuantizer,
        act: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, weight_fake_quant=weight_fake_quant, act=act, **kwargs)
        check_bn(self, bn)
        self.bn = bn
        self.bn_frozen = is_frozen_batch_norm(bn)
        if weight_fake_quant.normalizes_input:
            self._check_fold_after(weight_fake_quant)

    def _check_fold_after(self, fq: FakeQuantizer) -> None:
        """Folding after a normalising quantizer scales each output channel's levels by its own factor, which only
        a per-channel grid over the output channels holds (a grouped ConvTranspose has no such axis)."""
        grouped_transpose = self.weight_ch_axis != 0 and self.groups > 1
        if fq.ch_axis is None or grouped_transpose:
            raise SchemeError(
                f"{type(fq).__name__} normalises the weight of a {type(self).__name__}, so the BatchNorm is folded "
                f"after quantizing, which multiplies each output channel's levels by its own factor; that needs a "
                f"per-channel weight grid over the output channels, and {fq.scheme.describe()}"
                + (" on a grouped transposed convolution" if grouped_transpose else "")
                + " is not one. Use a per-channel backend or qconfig, or another weight quantizer for this layer."
            )

    @classmethod
    def _extra_init(cls, bn: nn.Module | None) -> dict[str, Any]:
        if bn is None:
            raise TypeError(f"{cls.__name__} needs a BatchNorm; convert a fused <layer>Bn container.")
        return {"bn": copy.deepcopy(bn)}

    def freeze_bn(self, on: bool = True) -> None:
        """Use the running statistics (and stop updating them) while training, as the deploy model does."""
        self.bn_frozen = on or is_frozen_batch_norm(self.bn)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        factor = bn_scale_factor(self.bn)
        return fold_weight(self.weight, self, factor), fold_bias(self.bn, self.bias, factor)

    def folded_weight_qparams(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel grid of ``weight_fake_quant``'s output folded by ``factor`` (a normalising quantizer,
        zero point 0): level ``q`` times ``factor`` is level ``q * sign(factor)`` of scale ``scale * |factor|``.
        A zero factor (a channel the BN zeroes) gets the smallest scale, so its weights quantize to 0."""
        scale = self.weight_fake_quant.scale.detach() * factor.detach().abs()
        scale = torch.clamp(scale.to(torch.float32), min=SCALE_EPS)
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)

    def _quantize_then_fold(self, factor: torch.Tensor) -> torch.Tensor:
        """Eval weight for a normalising quantizer: quantize the unfolded weight, then fold, on the folded grid
        (``folded_weight_qparams``), so the value is exactly what a fixed quantizer with that grid computes from
        the folded weight (what the deploy view runs once ``bake`` has stored the quantized weight)."""
        fq = self.weight_fake_quant
        folded = fold_weight(fq(self.weight), self, factor)
        if not fq.quant_enabled.item():
            return folded
        scale, zero_point = self.folded_weight_qparams(factor)
        return fake_quantize(folded, scale, zero_point, fq.scheme.qmin, fq.scheme.qmax, fq.ch_axis, fq.exact)

    def _qat_forward(self, x: torch.Tensor, **op_kwargs: Any) -> torch.Tensor:
        if self.weight_fake_quant.normalizes_input:
            return self._fold_after_forward(x, **op_kwargs)
        if not self.training or self.bn_frozen:
            return super()._qat_forward(x, **op_kwargs)
        factor = bn_scale_factor(self.bn)
        weight = self.weight_fake_quant(fold_weight(self.weight, self, factor))
        weight = (weight / channel_view(factor, self)).to(weight.dtype)  # a float32 BN must not promote the weight
        return self._activate(self.bn(self._op(x, weight, self.bias, **op_kwargs)))

    def _fold_after_forward(self, x: torch.Tensor, **op_kwargs: Any) -> torch.Tensor:
        """The forward for a normalising weight quantizer (module docstring): while training ``quantize(w) *
        factor / factor`` is the quantized weight itself, feeding the BN; else the folded deploy arithmetic."""
        if self.training and not self.bn_frozen:
            return self._activate(self.bn(self._op(x, self.weight_fake_quant(self.weight), self.bias, **op_kwargs)))
        factor = bn_scale_factor(self.bn)
        bias = fold_bias(self.bn, self.bias, factor)
        return self._activate(self._op(x, self._quantize_then_fold(factor), bias, **op_kwargs))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bn_frozen={self.bn_frozen}"


class _ConvOp:
    """``_op`` for Conv1d/2d/3d: the functional convolution, with explicit padding for non-zero padding modes."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = _CONV[len(self.kernel_size)]
        if self.padding_mode == "zeros":
            return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class _ConvTransposeOp:
    """``_op`` and ``forward`` for ConvTranspose1d/2d; the weight is ``[in, out/groups, k...]``."""

    weight_ch_axis: ClassVar[int] = 1

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return self._qat_forward(input, output_size=output_size)

    def _op(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        output_size: list[int] | None = None,
    ) -> torch.Tensor:
        dims = len(self.kernel_size)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation
        )
        conv = _CONV_TRANSPOSE[dims]
        return conv(x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation)


class _LinearOp:
    """``_op`` for Linear."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class QConv1d(_ConvOp, QATModule, nn.Conv1d):
    """Conv1d with a fake-quantized weight."""


class QConv2d(_ConvOp, QATModule, nn.Conv2d):
    """Conv2d with a fake-quantized weight."""


class QConv3d(_ConvOp, QATModule, nn.Conv3d):
    """Conv3d with a fake-quantized weight."""


class QConvTranspose1d(_ConvTransposeOp, QATModule, nn.ConvTranspose1d):
    """ConvTranspose1d with a fake-quantized weight (per-channel axis 1)."""


class QConvTranspose2d(_ConvTransposeOp, QATModule, nn.ConvTranspose2d):
    """ConvTranspose2d with a fake-quantized weight (per-channel axis 1)."""


class QLinear(_LinearOp, QATModule, nn.Linear):
    """Linear with a fake-quantized weight."""


class QConvBn1d(_ConvOp, QATBnModule, nn.Conv1d):
    """Conv1d + BatchNorm1d folded in simulation."""


class QConvBn2d(_ConvOp, QATBnModule, nn.Conv2d):
    """Conv2d + BatchNorm2d folded in simulation."""


class QConvBn3d(_ConvOp, QATBnModule, nn.Conv3d):
    """Conv3d + BatchNorm3d folded in simulation."""


class QConvTransposeBn1d(_ConvTransposeOp, QATBnModule, nn.ConvTranspose1d):
    """ConvTranspose1d + BatchNorm1d folded in simulation (per-channel axis 1)."""


class QConvTransposeBn2d(_ConvTransposeOp, QATBnModule, nn.ConvTranspose2d):
    """ConvTranspose2d + BatchNorm2d folded in simulation (per-channel axis 1)."""


class QLinearBn1d(_LinearOp, QATBnModule, nn.Linear):
    """Linear + BatchNorm1d folded in simulation."""


#: torch layer -> (QAT layer, QAT layer with BatchNorm).
_QAT_BY_LAYER: dict[type[nn.Module], tuple[type[QATModule], type[QATBnModule]]] = {
    nn.Conv1d: (QConv1d, QConvBn1d),
    nn.Conv2d: (QConv2d, QConvBn2d),
    nn.Conv3d: (QConv3d, QConvBn3d),
    nn.ConvTranspose1d: (QConvTranspose1d, QConvTransposeBn1d),
    nn.ConvTranspose2d: (QConvTranspose2d, QConvTransposeBn2d),
    nn.Linear: (QLinear, QLinearBn1d),
}

#: Float type (plain layer or fused container) -> QAT type; activations become the QAT module's ``act``.
QAT_MODULES: dict[type[nn.Module], type[QATModule]] = {
    **{layer_type: plain for layer_type, (plain, _) in _QAT_BY_LAYER.items()},
    **{fused: _QAT_BY_LAYER[layer_type][has_bn] for (layer_type, has_bn, _), fused in FUSED_MODULES.items()},
}


def freeze_bn(model: nn.Module) -> None:
    """Freeze the BatchNorm of every QAT BN module in ``model`` (running statistics, no more updates)."""
    for module in model.modules():
        if isinstance(module, QATBnModule):
            module.freeze_bn(True)


def unfreeze_bn(model: nn.Module) -> None:
    """Return every QAT BN module in ``model`` to batch statistics (frozen-BN modules stay frozen)."""
    for module in model.modules():
        if isinstance(module, QATBnModule):
            module.freeze_bn(False)
