"""``mq.quantize``: the whole job in one call, in the shape users of other toolkits know.

``qmodel, result = mq.quantize(model, "tensorrt", loader)`` prepares, calibrates (optionally runs a PTQ method),
exports every artifact the target consumes, verifies them in real runtimes and, given an accuracy function, scores
the float model, the simulation and the deployed artifact: what ``mq quantize`` does, through the same code
(``mq_core.pipeline.workflow``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError
from mq_core.pipeline.calibrate import DEFAULT_BATCH_SIZE
from mq_core.pipeline.workflow import CalibrationData, QuantizeSummary, quantize_for_backends
from mq_core.quant.qconfig import QConfig, QConfigPreset

log = logging.getLogger(__name__)


def quantize(
    model: nn.Module,
    backend: str | Backend,
    calib_data: Any = None,
    *,
    forward_loop: Callable[[nn.Module], Any] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    qconfig: QConfig | QConfigPreset | str | Mapping[str, QConfig | QConfigPreset | str | None] | None = None,
    accuracy_budget: float | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    observer: str | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    verify_inputs: tuple[torch.Tensor, ...] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = None,
    model_ref: str | None = None,
    progress: bool = False,
    report: bool = True,
    **prepare_options: Any,
) -> tuple[nn.Module, QuantizeSummary]:
    """Quantize ``model`` for ``backend``, export its artifacts, verify them in real runtimes; ``mq quantize`` in
    Python. Returns the prepared, calibrated model (on the CPU) and the result.

    Args:
        model: the float model (not modified).
        backend: one target, by name (``"tensorrt"``, ``"qdq"``, ...) or a ``Backend``.
        calib_data: calibration data, read by ``mq.calibrate``'s rule: a tensor ``[N, ...]`` (split into batches of
            ``batch_size``), a Dataset, a DataLoader or a list of batches (read more than once: not a generator).
            The first batch is the example the model is traced and exported with.
        forward_loop: instead of ``calib_data``, ``forward_loop(model)`` runs calibration batches through the model
            it is given (as in NVIDIA ModelOpt); it is called on the float model until its first call of the model,
            whose inputs become the example, then on the prepared model with observers on. A PTQ ``method`` needs
            ``calib_data``.
        eval_fn: ``eval_fn(model) -> float``, an accuracy in percent, applied to the float model, the simulation
            and the deployed artifact (a ``mq.RuntimeModule``).
        qconfig: a preset name (``"w8a8"``, ``"w4a4"``, ``"reduce-range"``), a preset or a QConfig; default the
            backend's. Or per-layer qconfigs, ``{"layer4": "w8a8", "*": "w4a8", "fc": "float"}`` (``mq.prepare``).
        accuracy_budget: search per-layer bit widths (or float) first, starting from ``qconfig`` everywhere, that
            stay within this many points of ``eval_fn`` below the float model (without ``eval_fn``: dB of output
            SQNR below the all-8-bit model); ``result.mixed_precision`` says what it chose
            (``mq.search_mixed_precision``).
        method, method_options: a PTQ method after calibration (``"adaround"``, needs mq-algos) and its options.
        observer: the activation observer that calibrates (``"minmax"``, ``"percentile"``, ``"mse"``, ``"kl"``).
        out: output folder; ``out/<backend>/`` receives ``qmodel.pt`` and one folder per exporter. Default: a new
            temporary folder (its path is ``result.out_dir``).
        device: where to calibrate (``"cpu"``, ``"cuda"``); default the model's device. Batches are moved there.
        input_shapes: shapes of the example inputs, one per model input, batch first, when the export's example
            should not be the first batch.
        verify_inputs: inputs to verify the artifacts on (default: the example).
        batch_size, num_batches: batching of tensor or Dataset data; at most this many batches per pass.
        model_ref: ``"pkg.module:factory"`` recorded in the checkpoint, so ``mq export`` can rebuild the model.
        progress: progress bars (stderr).
        report: write ``report.json`` and ``report.html`` into ``out`` (the summary, the layer-wise verification and
            ``mq.sensitivity`` on two calibration batches; docs/getting-started.md, "The report").
        prepare_options: passed to ``mq.prepare`` (``skip``, ``modules``, ``leaf_modules``, ...).

    Returns:
        ``(qmodel, result)``: ``result`` is a ``QuantizeSummary``: ``passed``, ``reports`` (verification per
        exporter), ``results`` (``ExportResult`` per exporter), ``artifacts``, ``checkpoint``, the accuracies
        (``float_accuracy``, ``outcome.sim_accuracy``, ``outcome.deployed_accuracy``), ``table()`` (the summary
        ``mq quantize`` prints) and ``to_dict()``. A failed verification does not raise: check ``result.passed``.
        ``mq.RuntimeModule(result)`` runs the deployed artifact.

    Bad arguments raise ``MQError`` subclasses before any model work where they can be checked.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize() needs the float model (an nn.Module), got {type(model).__name__}.")
    if not isinstance(backend, (str, Backend)) or backend == "all":
        raise ConfigError(f"quantize() takes one backend (a name such as 'tensorrt', or a Backend), got {backend!r}; "
                          "call it once per backend (mq.list_backends() names them).")
    calib = None if calib_data is None else CalibrationData(calib_data, batch_size, num_batches)
    if out is None:
        out = tempfile.mkdtemp(prefix="mq-quantize-")
        log.info("mq.quantize writes to %s", out)
    summary = quantize_for_backends(
        model, [backend], calib, out, eval_fn=eval_fn, forward_loop=forward_loop, keep_models=True, device=device,
        progress=progress, qconfig=qconfig, observer=observer, method=method, method_options=method_options,
        verify_inputs=verify_inputs, input_shapes=input_shapes, model_ref=model_ref, prepare_options=prepare_options,
        accuracy_budget=accuracy_budget,
        report=report,
    )
    qmodel = summary.outcome.qmodel
    assert qmodel is not None
    return qmodel, summary
