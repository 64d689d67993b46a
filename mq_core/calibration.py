"""Calibration: switch observers and quantization on and off for a whole model, and run calibration data.

Weights and activations can be switched separately (``weights=...``, ``activations=...``). Weight quantizers
need no data: when quantization is enabled for an unobserved weight quantizer, it observes its own weight.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mq_core.errors import CalibrationError
from mq_core.quant.fake_quant import FakeQuantizer

log = logging.getLogger(__name__)


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


def num_inputs(model: nn.Module) -> int | None:
    """Number of positional inputs of a traced model (None when unknown)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return None
    return sum(1 for n in graph.nodes if n.op == "placeholder")


def run_batch(model: nn.Module, batch: Any, n_inputs: int | None = None) -> Any:
    """Call ``model`` on one batch: a tensor, a (inputs..., target) tuple/list from a DataLoader, or a dict."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        n = n_inputs if n_inputs is not None else 1
        return model(*batch[:n])
    raise CalibrationError(
        f"calibration batches must be tensors, (inputs, target) tuples or dicts; got {type(batch).__name__}."
    )


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Run ``data`` through ``model`` with observers on, then freeze qparams and enable quantization.

    Args:
        data: an iterable of batches (DataLoader, list of tensors, ...).
        num_batches: stop after this many batches (default: all).
        progress: show a tqdm progress bar.
    """
    enable_calibration(model)
    was_training = model.training
    model.eval()
    n_inputs = num_inputs(model)
    iterator = iter(data) if num_batches is None else itertools.islice(iter(data), num_batches)
    total = num_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(iterator, total=total, desc="calibrate", unit="batch", disable=not progress,
                              leave=False):
                run_batch(model, batch, n_inputs)
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        disable_all(model)
        raise CalibrationError(
            "calibration data is empty: no batch was produced. Pass a non-empty DataLoader or list of tensors "
            "(a few hundred representative samples are usually enough)."
        )
    log.info("calibrated on %d batches", seen)
    enable_quantization(model)
    return model

