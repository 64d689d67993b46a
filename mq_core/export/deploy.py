"""The deploy view of a prepared model: what the target computes, with nothing left to learn or observe.

* QAT layers become ``DeployLayer``: BN folded, the weight stored as integer codes plus qparams and dequantized by
  ``mq::dequantize`` (an int8 initializer + DequantizeLinear in ONNX).
* Activation fake quantizers become ``DeployQuantizer``: frozen scale/zero-point buffers and
  ``mq::quantize_dequantize`` (QuantizeLinear + DequantizeLinear in ONNX). Learnable quantizers are frozen into
  the fixed qparams they are equivalent to (``FakeQuantizer.export_qparams``).

Running the deploy view in torch gives the exact-rounding simulation; exporting it gives the canonical QDQ ONNX.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mq_core.calibration import quantizers
from mq_core.errors import ExportError
from mq_core.export import ops  # noqa: F401  (registers the mq:: custom ops)
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import quantize
from mq_core.quant.scheme import QuantScheme


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
        if layer.bias is not None:
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


def deploy_view(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` in eval mode with every quantizer frozen (see the module docstring)."""
    missing = uncalibrated(qmodel)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ExportError(
            f"cannot export before calibration: {len(missing)} quantizer(s) have no qparams ({shown}). Run "
            "mq.calibrate(qmodel, data) first."
        )
    model = copy.deepcopy(qmodel).eval()
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
    return model
