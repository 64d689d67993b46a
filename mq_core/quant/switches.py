"""Switch a model's fake quantizers: observers on or off, quantization on or off, statistics forgotten.

These act on the ``FakeQuantizer`` modules of any model (prepared or deploy-bound) and know nothing of data or
plugins, which is why they live in the quant layer and calibration (``mq_core.pipeline.calibrate``), export and
verification all use them. Weights and activations can be switched separately (``weights=...``,
``activations=...``). Weight quantizers need no data: when quantization is enabled for an unobserved weight
quantizer, it observes its own weight.
"""

from __future__ import annotations

import torch
from torch import nn

from mq_core.errors import CalibrationError
from mq_core.quant.fake_quant import FakeQuantizer


def quantizers(model: nn.Module, weights: bool = True, activations: bool = True) -> dict[str, FakeQuantizer]:
    """The model's fake quantizers by qualified name, filtered by role."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            is_weight = getattr(module, "role", "activation") == "weight"
            if (weights and is_weight) or (activations and not is_weight):
                found[name] = module
    return found


def _weight_owners(model: nn.Module) -> dict[int, nn.Module]:
    return {id(m.weight_fake_quant): m for m in model.modules() if isinstance(
        getattr(m, "weight_fake_quant", None), FakeQuantizer)}


def enable_calibration(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Observers on, quantization off, for the selected quantizers."""
    for fq in quantizers(model, weights, activations).values():
        fq.enable_observation(True)
        fq.enable_quantization(False)


def enable_quantization(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Freeze qparams from what was observed and switch quantization on.

    Raises ``CalibrationError`` listing the activation quantizers that never saw data.
    """
    selected = quantizers(model, weights, activations)
    owners = _weight_owners(model)
    for fq in selected.values():
        owner = owners.get(id(fq))
        if owner is not None and not fq.is_calibrated and fq.observer is not None and not fq.observer.observed:
            with torch.no_grad():
                fq.observer(owner.deploy_weight_and_bias()[0])
            # enable_observation(False) below only refreshes qparams when observation was on; it never was here
            # (enable_quantization called without calibrate), so compute them now.
            fq.update_qparams()
        fq.enable_observation(False)
    missing = [name for name, fq in selected.items() if not fq.is_calibrated]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise CalibrationError(
            f"{len(missing)} quantizer(s) were never calibrated: {shown}. Run mq.calibrate(qmodel, data) with data "
            "that reaches them (a branch the calibration data never takes keeps its quantizers uncalibrated)."
        )
    for fq in selected.values():
        fq.enable_quantization(True)


def disable_all(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Observers and quantization off: the prepared model computes in float."""
    for fq in quantizers(model, weights, activations).values():
        fq.enable_observation(False)
        fq.enable_quantization(False)


def reset_calibration(model: nn.Module) -> None:
    """Forget every observed statistic and qparam and switch observers and quantization off (``FakeQuantizer.reset``
    for each quantizer): the state of a freshly prepared model, as far as calibration goes."""
    for fq in quantizers(model).values():
        fq.reset()
    disable_all(model)
