"""The main job end to end: float model -> prepared -> calibrated (-> PTQ) -> exported -> verified -> evaluated.

``mq quantize`` is a thin shell around ``quantize_for_backends``; Python users can call it directly. For every
backend it reports the float, simulated and deployed (real runtime) accuracy, the simulation-vs-runtime agreement
in quantization steps, the artifacts and the time each stage took.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from mq_core.checkpoint import save_checkpoint
from mq_core.errors import CalibrationError, MQError, VerificationError
from mq_core.export import ExportResult
from mq_core.export.manifest import is_export_folder
from mq_core.io import check_replaceable, check_writable, staged_directory
from mq_core.pipeline.calibrate import calibrate, model_inputs
from mq_core.pipeline.export import export_many
from mq_core.pipeline.prepare import prepare, prepare_info
from mq_core.pipeline.ptq import ptq
from mq_core.pipeline.verify import VerificationReport, feeds, select_runtimes, verify
from mq_core.plugins.lookup import get_backend, get_exporter
from mq_core.runtimes import isolation

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]
#: The prepared model's checkpoint in each backend folder, beside one folder per exporter.
CHECKPOINT = "qmodel.pt"
#: What a run may replace (see ``mq_core.io.check_replaceable``).
BACKEND_FOLDER = "a backend folder of `mq quantize` (no qmodel.pt or export written by mq)"


class RuntimeModule(nn.Module):
    """An exported artifact running in a real runtime, callable like the model (for accuracy functions).

    The runtime runs in its worker process (``mq_core.runtimes.isolation``): a crash raises ``RuntimeCrashError``
    instead of ending the caller. Inputs keep their dtypes (as the graph declares them)."""

    def __init__(self, runtime: Any, model: onnx.ModelProto) -> None:
        super().__init__()
        self.runtime = runtime
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        given = feeds(self.model, inputs)
        outputs = [torch.from_numpy(o) for o in isolation.run(self.runtime, self.model, given, "the exported model")]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


@dataclass
class BackendOutcome:
    """What happened for one backend."""

    backend: str
    qconfig: str = ""
    method: str | None = None
    sim_accuracy: float | None = None
    deployed_accuracy: float | None = None
    deployed_runtime: str | None = None
    reports: dict[str, VerificationReport] = field(default_factory=dict)
    results: dict[str, ExportResult] = field(default_factory=dict)
    checkpoint: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.reports) and all(r.passed for r in self.reports.values())

    def agreement(self) -> dict[str, tuple[float, float]]:
        """Per runtime, over every artifact and output: the worst difference in steps and the smallest fraction of
        exactly equal elements. Runtimes differ in kind (ONNX Runtime and TVM are bit-exact, OpenVINO on a CPU
        without VNNI emulates in float), so one pooled number would hide which runtime a difference comes from."""
        worst: dict[str, tuple[float, float]] = {}
        for report in self.reports.values():
            for c in report.checks:
                steps, exact = worst.get(c.runtime, (0.0, 1.0))
                # NaN (a runtime that produced NaN) must win, not vanish in max().
                worst[c.runtime] = (c.max_steps if math.isnan(c.max_steps) else max(steps, c.max_steps),
                                    min(exact, c.exact))
        return worst

    @property
    def notes(self) -> list[str]:
        """The verification notes of every exporter's report, each once."""
        return list(dict.fromkeys(n for r in self.reports.values() for n in r.notes))


@dataclass
class QuantizeSummary:
    float_accuracy: float | None
    outcomes: list[BackendOutcome]
    out_dir: Path

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)


class _Stages:
    """Times each stage and advances one progress bar per backend (prepare, calibrate, PTQ, export, verify ...)."""

    def __init__(self, backend: str, stages: list[str], timings: dict[str, float], progress: bool) -> None:
        self.timings = timings
        self.bar = tqdm(total=len(stages), desc=backend, unit="stage", disable=not progress, leave=False)

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_postfix_str(stage)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[stage] = time.perf_counter() - start
            self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _deployed_accuracy(outcome: BackendOutcome, qmodel: nn.Module, eval_fn: EvalFn) -> None:
    """Accuracy of the default exporter's first runnable artifact in the first available runtime of the backend's
    own list (``select_runtimes``, as ``verify`` picks them)."""
    backend = prepare_info(qmodel).target
    result = outcome.results.get(backend.default_exporter) or next(iter(outcome.results.values()))
    runnables = get_exporter(result.exporter).runnables(result)
    for runtime in select_runtimes(backend, None, []):
        for runnable in runnables:
            if runtime.available() and runtime.can_run(runnable.model):
                try:
                    outcome.deployed_accuracy = float(eval_fn(RuntimeModule(runtime, runnable.model)))
                except VerificationError as exc:  # the runtime crashed or raised on it: try the next runtime
                    log.warning("no deployed accuracy from %s: %s", runtime.name, exc)
                    continue
                outcome.deployed_runtime = runtime.name
                return


def _first_batch(calib: Iterable[Any]) -> Any:
    """The first batch (traced and exported as the example). ``calib`` is gone over again from the start for
    calibration, PTQ and each backend, so it must be re-iterable (a list, a DataLoader, the CLI's lazy
    ``CalibrationBatches``); a one-shot iterator would silently lose data and is refused."""
    if isinstance(calib, Iterator):
        raise CalibrationError("calibration data is a one-shot iterator (a generator?), but it is read more than "
                               "once; pass a list of batches, a DataLoader or another re-iterable object.")
    for batch in calib:
        return batch
    raise CalibrationError("no calibration data: pass a non-empty --calib (a tensor file, an image folder or a "
                           "loader factory).")


def _example_inputs(model: nn.Module, first: Any) -> tuple[Any, ...]:
    """The inputs ``prepare`` traces with, from the first calibration batch by the one data rule that calibration
    applies to every batch (``mq_core.pipeline.calibrate.model_inputs``): a tensor, the first item of an
    ``(x, y)`` tuple, or the dict entry named like the first parameter of the model's ``forward``."""
    args, kwargs = model_inputs(model, first, n_inputs=1)
    if args:
        return args
    first_parameter = next(iter(inspect.signature(model.forward).parameters), None)
    if first_parameter not in kwargs:
        raise CalibrationError(
            f"a dict batch gives the model keyword inputs {sorted(kwargs)}, but mq quantize traces the model with "
            "one positional input; name the entry after the first parameter of the model's forward."
        )
    return (kwargs[first_parameter],)


def is_backend_folder(path: Path) -> bool:
    """Whether ``path`` is a backend folder ``mq quantize`` wrote: a checkpoint, or an mq export inside it."""
    return (path / CHECKPOINT).is_file() or any(is_export_folder(p) for p in path.iterdir() if p.is_dir())


def write_outputs(qmodel: nn.Module, example: tuple[torch.Tensor, ...], folder: Path, model_ref: str | None
                  ) -> tuple[Path, dict[str, ExportResult]]:
    """Write the checkpoint and every exporter's folder into ``folder`` as one unit.

    They are built together in a staging folder and swapped in with one rename (``mq_core.io.staged_directory``),
    so whenever the process dies, ``folder`` holds either the previous run's checkpoint and exports or this run's,
    never a checkpoint beside exports made from another one (nor exports of an earlier run that this one no
    longer writes).
    """
    with staged_directory(folder, owned=is_backend_folder, what=BACKEND_FOLDER) as stage:
        save_checkpoint(qmodel, stage / CHECKPOINT, example, model_ref=model_ref)
        results = export_many(qmodel, example, stage)
    return folder / CHECKPOINT, {name: result.moved_to(folder / name) for name, result in results.items()}


def quantize_for_backend(
    model: nn.Module,
    backend: str,
    calib: Iterable[Any],
    out_dir: Path,
    *,
    qconfig: str | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    eval_fn: EvalFn | None = None,
    verify_inputs: tuple[torch.Tensor, ...] | None = None,
    model_ref: str | None = None,
    prepare_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> BackendOutcome:
    """Prepare, calibrate, optionally PTQ, export with all the backend's exporters, verify and evaluate.

    ``out_dir/<backend>/`` receives the checkpoint (``qmodel.pt``) and one folder per exporter, replacing that
    backend folder of an earlier run as a whole (see ``write_outputs``).
    """
    resolved = get_backend(backend)
    outcome = BackendOutcome(resolved.name, method=method)
    example = _example_inputs(model, _first_batch(calib))
    folder = out_dir / resolved.name
    check_replaceable(folder, owned=is_backend_folder, what=BACKEND_FOLDER)  # now, not after calibrating
    names = ["prepare", "calibrate", *(["ptq"] if method else []), "export", "verify",
             *(["evaluate (simulation)", "evaluate (runtime)"] if eval_fn is not None else [])]
    stages = _Stages(resolved.name, names, outcome.timings, progress)
    try:
        qmodel = stages.run("prepare", lambda: prepare(model, resolved, example, qconfig=qconfig,
                                                       **(prepare_options or {})))
        outcome.qconfig = qmodel.mq_info.qconfig.name
        stages.run("calibrate", lambda: calibrate(qmodel, calib, progress=progress))
        if method:
            stages.run("ptq", lambda: ptq(qmodel, method, calib, progress=progress, **(method_options or {})))
        outcome.checkpoint, outcome.results = stages.run(
            "export", lambda: write_outputs(qmodel, example, folder, model_ref))
        inputs = verify_inputs or example
        outcome.reports = stages.run("verify", lambda: {
            name: verify(result, inputs) for name, result in outcome.results.items()})
        if eval_fn is not None:
            outcome.sim_accuracy = stages.run("evaluate (simulation)", lambda: float(eval_fn(qmodel)))
            stages.run("evaluate (runtime)", lambda: _deployed_accuracy(outcome, qmodel, eval_fn))
    finally:
        stages.close()
    return outcome


def quantize_for_backends(
    model: nn.Module,
    backends: Sequence[str],
    calib: Iterable[Any],
    out_dir: str | Path,
    *,
    eval_fn: EvalFn | None = None,
    keep_going: bool = False,
    **options: Any,
) -> QuantizeSummary:
    """``quantize_for_backend`` for each backend; with ``keep_going`` one backend's error does not stop the rest."""
    _first_batch(calib)  # an empty source fails before the float model is evaluated
    out = check_writable(out_dir)  # a read-only --out fails now, not after minutes of calibration
    float_accuracy = float(eval_fn(model)) if eval_fn is not None else None
    outcomes = []
    for name in backends:
        try:
            outcomes.append(quantize_for_backend(model, name, calib, out, eval_fn=eval_fn, **options))
        except MQError as exc:
            if not keep_going:
                raise
            log.warning("backend %s failed: %s", name, exc)
            outcomes.append(BackendOutcome(name, error=str(exc)))
    return QuantizeSummary(float_accuracy, outcomes, out)
