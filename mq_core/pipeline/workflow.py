"""The main job end to end: float model -> prepared -> calibrated (-> PTQ) -> exported -> verified -> evaluated.

``mq quantize`` and ``mq.quantize`` are thin shells around ``quantize_for_backends``. For every backend it reports
the float, simulated and deployed (real runtime) accuracy, the simulation-vs-runtime agreement in quantization
steps, the artifacts and the time each stage took.

Devices: the float model is traced where it is; with ``device`` the prepared model is moved there for calibration
and PTQ, and every calibration batch is moved to the prepared model's device. Export, verification and evaluation
run on the CPU (the runtimes that check the artifacts are CPU runtimes), so the prepared model ends on the CPU.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mq_core.checkpoint import save_checkpoint
from mq_core.errors import CalibrationError, ConfigError, MQError, VerificationError, describe_exception
from mq_core.export import ExportResult
from mq_core.export.manifest import is_export_folder
from mq_core.io import check_replaceable, check_writable, staged_directory
from mq_core.pipeline.calibrate import CalibrationData, calibrate, model_device, model_inputs, to_device
from mq_core.pipeline.export import export_many
from mq_core.pipeline.mixed_precision import MixedPrecisionResult, search_mixed_precision
from mq_core.pipeline.prepare import prepare, prepare_info
from mq_core.pipeline.ptq import ptq
from mq_core.pipeline.resolve import QConfigLike, with_observer
from mq_core.pipeline.runs import select_runtimes
from mq_core.pipeline.runtime_module import RuntimeModule
from mq_core.pipeline.sensitivity import SensitivityReport, sensitivity
from mq_core.pipeline.verify import VerificationReport, verify
from mq_core.plugins.lookup import get_backend, get_exporter, list_backends
from mq_core.report import write_report
from mq_core.text import render_table

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]
ForwardLoop = Callable[[nn.Module], Any]
#: The prepared model's checkpoint in each backend folder, beside one folder per exporter.
CHECKPOINT = "qmodel.pt"
#: Samples of the example batch the report's sensitivity analysis runs (``mq quantize`` without ``--no-report``):
#: few, because the analysis costs about 2K + 3 runs of the model over them for K quantizers (``mq.sensitivity``);
#: on ResNet-18 (50 quantizers) at 224x224 that is about 100 forward passes of 8 images.
REPORT_SAMPLES = 8
#: What a run may replace (see ``mq_core.io.check_replaceable``).
BACKEND_FOLDER = "a backend folder of `mq quantize` (no qmodel.pt or export written by mq)"


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
    #: the prepared, calibrated model (on the CPU); kept by ``mq.quantize``, dropped by ``mq quantize``
    qmodel: nn.Module | None = field(default=None, repr=False, compare=False)
    #: ``mq.sensitivity`` of the prepared model on a few calibration batches, for the report (None without one)
    sensitivity: SensitivityReport | None = field(default=None, repr=False, compare=False)
    #: the per-layer qconfigs ``--accuracy-budget`` chose (``mq.search_mixed_precision``; None without a budget)
    mixed_precision: MixedPrecisionResult | None = field(default=None, compare=False)

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

    def export_result(self, exporter: str | None = None) -> ExportResult:
        """One export of this backend: ``exporter``'s, by default the backend's default exporter's (else the
        first); what ``mq.RuntimeModule(outcome)`` runs."""
        if not self.results:
            raise ConfigError(f"backend {self.backend} has no export ({self.error or 'it was not exported'}).")
        if exporter is None:
            default = get_backend(self.backend).default_exporter if self.backend in list_backends() else None
            return self.results.get(default) or next(iter(self.results.values()))
        if exporter not in self.results:
            raise ConfigError(f"backend {self.backend} has no export by exporter {exporter!r}; it has "
                              f"{', '.join(sorted(self.results))}.")
        return self.results[exporter]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "qconfig": self.qconfig, "method": self.method, "passed": self.passed,
                "error": self.error, "simulated_accuracy": self.sim_accuracy,
                "deployed_accuracy": self.deployed_accuracy, "deployed_runtime": self.deployed_runtime,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "artifacts": {e: [str(a.path) for a in r.artifacts] for e, r in self.results.items()},
                "verification": {e: r.to_dict() for e, r in self.reports.items()}, "timings": self.timings,
                "mixed_precision": self.mixed_precision.to_dict() if self.mixed_precision else None}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


@dataclass
class QuantizeSummary:
    """The result of ``mq.quantize`` / ``mq quantize``: float accuracy, and per backend what was written, how the
    artifacts verified and how accurate the simulation and the deployed artifact are.

    For one backend (``mq.quantize``) its outcome's fields are also here: ``result.reports``,
    ``result.results`` (exports by exporter name), ``result.artifacts``, ``result.checkpoint``.
    """

    float_accuracy: float | None
    outcomes: list[BackendOutcome]
    out_dir: Path
    #: the run's report.html (report.json beside it); None when the run wrote no report
    report: Path | None = None

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)

    @property
    def backends(self) -> list[str]:
        return [o.backend for o in self.outcomes]

    @property
    def outcome(self) -> BackendOutcome:
        """The outcome of the only backend (an error when there are several: use ``outcomes``)."""
        if len(self.outcomes) != 1:
            raise ConfigError(f"this result covers {len(self.outcomes)} backends ({', '.join(self.backends)}); "
                              "pick one from .outcomes.")
        return self.outcomes[0]

    @property
    def results(self) -> dict[str, ExportResult]:
        return self.outcome.results

    def export_result(self, exporter: str | None = None) -> ExportResult:
        """One export of the only backend (``BackendOutcome.export_result``)."""
        if len(self.outcomes) != 1:
            raise ConfigError(f"this result covers {len(self.outcomes)} backends ({', '.join(self.backends)}); pass "
                              "the one to run, e.g. RuntimeModule(result.outcomes[0]).")
        return self.outcomes[0].export_result(exporter)

    @property
    def reports(self) -> dict[str, VerificationReport]:
        return self.outcome.reports

    @property
    def artifacts(self) -> list[Any]:
        return [a for r in self.outcome.results.values() for a in r.artifacts]

    @property
    def checkpoint(self) -> Path | None:
        return self.outcome.checkpoint

    @property
    def mixed_precision(self) -> MixedPrecisionResult | None:
        """The mixed-precision choice of ``accuracy_budget`` (the first backend's that has one), else None."""
        return next((o.mixed_precision for o in self.outcomes if o.mixed_precision is not None), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``mq quantize --json``)."""
        return {"passed": self.passed, "float_accuracy": self.float_accuracy, "out_dir": str(self.out_dir),
                "backends": [o.to_dict() for o in self.outcomes]}

    def table(self, title: str = "mq quantize") -> str:
        """The summary ``mq quantize`` prints: one row per backend, then its checkpoint, artifacts, timings, notes
        and any failed verification, and the verdict."""
        lines = [title]
        if self.float_accuracy is not None:
            lines.append(f"float accuracy: {self.float_accuracy:.2f}%")
        rows = []
        for o in self.outcomes:
            if o.error:
                rows.append([o.backend, "-", "-", "-", "-", "error", "-", "FAIL"])
                continue
            deployed = _percent(o.deployed_accuracy) + (f" ({o.deployed_runtime})" if o.deployed_runtime else "")
            agreement = "; ".join(f"{runtime} {steps:.3g} ({100 * exact:.1f}% exact)"
                                  for runtime, (steps, exact) in o.agreement().items())
            rows.append([o.backend, o.qconfig + (f" + {o.method}" if o.method else ""), _percent(o.sim_accuracy),
                         deployed, agreement, str(len([a for r in o.results.values() for a in r.artifacts])),
                         f"{sum(o.timings.values()):.1f}s", "PASS" if o.passed else "FAIL"])
        lines.append(render_table(["backend", "qconfig", "simulated acc", "deployed acc (runtime)",
                                   "sim vs runtime: max steps (exact)", "artifacts", "time", "result"], rows))
        for o in self.outcomes:
            if o.error:
                lines.append(f"\n{o.backend}: {o.error}")
                continue
            lines.append(f"\n{o.backend}: checkpoint {o.checkpoint}")
            for result in o.results.values():
                for artifact in result.artifacts:
                    lines.append(f"  {result.exporter:<16} {artifact.kind:<22} {artifact.path}")
            lines.append("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in o.timings.items()))
            if o.mixed_precision is not None:
                lines.extend(f"  {line}" for line in o.mixed_precision.lines())
            lines.extend(f"  note: {note}" for note in o.notes)
            for exporter, report in o.reports.items():
                if report.layers is not None:
                    lines.append(f"  layer-wise ({exporter}):")
                    lines.extend(f"    {line}" for line in report.layers.summary_lines())
            for exporter, report in o.reports.items():
                if not report.passed:
                    lines.append(f"  verification of {exporter} FAILED:\n" + report.table())
        if self.report is not None:
            lines.append(f"\nreport: {self.report} (data: {self.report.with_suffix('.json').name})")
        lines.append("\n" + ("PASS: every artifact agrees with the simulation (within tolerance, or drift with "
                              "every op within one step locally)." if self.passed else "FAIL: see above."))
        return "\n".join(lines)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class _Stages:
    """Times each stage of one backend and shows progress: in a terminal a bar per backend, with the calibration
    and PTQ bars nested under it; elsewhere (a log file, CI) one line per finished stage, since bars redrawn with
    carriage returns are unreadable there."""

    def __init__(self, backend: str, stages: list[str], timings: dict[str, float], progress: bool) -> None:
        self.backend = backend
        self.timings = timings
        self.lines = progress and not _stderr_is_terminal()
        self.bar = tqdm(total=len(stages), desc=backend, unit="stage", disable=not progress or self.lines,
                        leave=False)

    @property
    def inner_progress(self) -> bool:
        """Whether the steps inside a stage (calibration, PTQ) show bars of their own."""
        return not self.bar.disable

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_postfix_str(stage)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[stage] = time.perf_counter() - start
            self.bar.update()
            if self.lines:
                tqdm.write(f"{self.backend}: {stage} {self.timings[stage]:.1f}s", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device (None stays None: the model's own); a ConfigError when torch cannot use it."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({describe_exception(exc)}); use 'cpu' or "
                          "'cuda' (or 'cuda:N').") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but torch {torch.__version__} sees no CUDA device "
                              f"(built with CUDA {torch.version.cuda or 'none: a CPU-only build'}); use 'cpu', or "
                              "install a CUDA build of torch on a machine with an NVIDIA GPU.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered "
                              "from 0.")
    elif resolved.type != "cpu":
        raise ConfigError(f"device {device!r}: mq calibrates on 'cpu' or 'cuda' devices only.")
    return resolved


class _Captured(Exception):
    """Raised inside a forward loop at the model's first call, carrying its inputs."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def _first_call(model: nn.Module, forward_loop: ForwardLoop) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs of the first call ``forward_loop`` makes to ``model``; the loop is stopped right there, so the
    model runs no batch."""
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, kwargs)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_loop(model)
    except _Captured as captured:
        return captured.args, captured.kwargs
    except MQError:
        raise
    except Exception as exc:
        raise CalibrationError(f"forward_loop raised {describe_exception(exc)} before calling the model; it must "
                               "call model(batch) on calibration batches.") from exc
    finally:
        handle.remove()
    raise CalibrationError("forward_loop returned without calling the model, so there are no inputs to trace it "
                           "with; it must call model(batch) on calibration batches.")


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
                    deployed = RuntimeModule(runnable.model, runtime, artifact=runnable.artifact)
                    outcome.deployed_accuracy = float(eval_fn(deployed))
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


def _traced_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The one positional input ``prepare`` traces with, from a call's ``(args, kwargs)``: its positional inputs,
    else the keyword input named like the first parameter of the model's ``forward``."""
    if args:
        return args
    first_parameter = next(iter(inspect.signature(model.forward).parameters), None)
    if first_parameter not in kwargs:
        raise CalibrationError(
            f"a dict batch gives the model keyword inputs {sorted(kwargs)}, but mq quantize traces the model with "
            "one positional input; name the entry after the first parameter of the model's forward."
        )
    return (kwargs[first_parameter],)


def _example_inputs(model: nn.Module, first: Any) -> tuple[Any, ...]:
    """The inputs ``prepare`` traces with, from the first calibration batch by the one data rule that calibration
    applies to every batch (``mq_core.pipeline.calibrate.model_inputs``): a tensor, the first item of an
    ``(x, y)`` tuple, or the dict entry named like the first parameter of the model's ``forward``."""
    return _traced_inputs(model, *model_inputs(model, first, n_inputs=1))


def shaped_inputs(inputs: tuple[Any, ...], shapes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    """Example inputs of the given ``shapes`` (``--input-shape``), one per model input, in each input's dtype and
    device. Where a shape differs from the data's only in the batch dimension, its samples are the data's (repeated
    as needed), so export and verification see real values; otherwise they are seeded random numbers."""
    if len(shapes) != len(inputs):
        raise ConfigError(f"{len(shapes)} input shape(s) given for a model traced with {len(inputs)} input(s); give "
                          "one --input-shape per model input, in order.")
    out = []
    generator = torch.Generator().manual_seed(0)
    for position, (shape, given) in enumerate(zip(shapes, inputs)):
        shape = [int(d) for d in shape]
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"input shape {shape} (input {position}) must list positive sizes, batch first, e.g. "
                              "1,3,224,224.")
        if not isinstance(given, torch.Tensor):
            raise ConfigError(f"input {position} is a {type(given).__name__}, not a tensor; --input-shape applies "
                              "to tensor inputs only.")
        if list(given.shape[1:]) == shape[1:] and given.shape[0] > 0:
            rows = torch.arange(shape[0]) % given.shape[0]
            out.append(given[rows.to(given.device)].clone())
        elif given.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=generator).to(device=given.device, dtype=given.dtype))
        else:  # token ids and other integer inputs: values the data holds
            low, high = int(given.min()), int(given.max())
            out.append(torch.randint(low, high + 1, shape, generator=generator).to(given.device, given.dtype))
    return tuple(out)


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


def _head(batch: Any, samples: int) -> Any:
    """The first ``samples`` samples of ``batch`` (every tensor with a batch dimension in it, nested as
    ``to_device`` walks it)."""
    if isinstance(batch, torch.Tensor):
        return batch[:samples] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {key: _head(value, samples) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_head(item, samples) for item in batch)
    return batch


def _report_sensitivity(qmodel: nn.Module, example: tuple[Any, ...]) -> SensitivityReport | None:
    """``mq.sensitivity`` on the first ``REPORT_SAMPLES`` samples of the example batch, by output SQNR (never the
    user's eval: it may be slow, and the report is a by-product). A model it cannot analyse gets a report without
    the sensitivity parts, not a failed run."""
    try:
        return sensitivity(qmodel, [_head(example, REPORT_SAMPLES)])
    except MQError as exc:
        log.warning("the report has no sensitivity analysis: %s", exc)
        return None


def _cpu(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(to_device(x, torch.device("cpu")) for x in inputs)


def quantize_for_backend(
    model: nn.Module,
    backend: Any,
    calib: Iterable[Any] | None,
    out_dir: Path,
    *,
    forward_loop: ForwardLoop | None = None,
    qconfig: QConfigLike | Mapping[str, QConfigLike] = None,
    observer: str | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    eval_fn: EvalFn | None = None,
    verify_inputs: tuple[torch.Tensor, ...] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    device: torch.device | None = None,
    model_ref: str | None = None,
    prepare_options: dict[str, Any] | None = None,
    progress: bool = True,
    analyze: bool = False,
    accuracy_budget: float | None = None,
) -> BackendOutcome:
    """Prepare, calibrate (on ``calib`` batches, or by calling ``forward_loop(qmodel)``), optionally PTQ, export
    with all the backend's exporters, verify and evaluate; with ``analyze``, ``mq.sensitivity`` of the prepared
    model on the first ``REPORT_SAMPLES`` samples of the example batch for the report.

    ``out_dir/<backend>/`` receives the checkpoint (``qmodel.pt``) and one folder per exporter, replacing that
    backend folder of an earlier run as a whole (see ``write_outputs``). The outcome holds the prepared model
    (``qmodel``, on the CPU). With ``accuracy_budget``, ``mq.search_mixed_precision`` first chooses per-layer
    qconfigs starting from ``qconfig`` (``outcome.mixed_precision``), and the model is prepared with them.
    """
    resolved = get_backend(backend)
    outcome = BackendOutcome(resolved.name, method=method)
    if calib is not None:
        example = _example_inputs(model, _first_batch(calib))
    else:
        assert forward_loop is not None
        example = _traced_inputs(model, *_first_call(model, forward_loop))
    example = tuple(to_device(x, model_device(model)) for x in example)  # traced where the float model is
    if input_shapes:
        example = shaped_inputs(example, input_shapes)
    folder = out_dir / resolved.name
    check_replaceable(folder, owned=is_backend_folder, what=BACKEND_FOLDER)  # now, not after calibrating
    names = [*(["mixed precision"] if accuracy_budget is not None else []), "prepare", "calibrate",
             *(["ptq"] if method else []), "export", "verify",
             *(["sensitivity"] if analyze else []),
             *(["evaluate (simulation)", "evaluate (runtime)"] if eval_fn is not None else [])]
    stages = _Stages(resolved.name, names, outcome.timings, progress)
    inner = stages.inner_progress
    try:
        chosen = with_observer(resolved, qconfig, observer) if accuracy_budget is None else None
        if accuracy_budget is not None:
            outcome.mixed_precision = stages.run("mixed precision", lambda: search_mixed_precision(
                model, resolved, example, None if calib is None else CalibrationData(calib).on(model_device(model)),
                forward_loop=None if calib is not None else forward_loop, accuracy_budget=accuracy_budget,
                eval_fn=eval_fn, qconfig=qconfig, observer=observer, **(prepare_options or {})))
            chosen = outcome.mixed_precision.qconfig
        qmodel = stages.run("prepare", lambda: prepare(model, resolved, example, qconfig=chosen,
                                                       **(prepare_options or {})))
        outcome.qconfig = qmodel.mq_info.qconfig_name
        if device is not None:
            qmodel.to(device)
        on_device = None if calib is None else CalibrationData(calib).on(model_device(qmodel))
        if on_device is None:
            stages.run("calibrate", lambda: calibrate(qmodel, forward_loop=forward_loop, progress=inner))
        else:
            stages.run("calibrate", lambda: calibrate(qmodel, on_device, progress=inner))
        if method:
            stages.run("ptq", lambda: ptq(qmodel, method, on_device, progress=inner, **(method_options or {})))
        qmodel.cpu()
        example = _cpu(example)
        outcome.qmodel = qmodel
        outcome.checkpoint, outcome.results = stages.run(
            "export", lambda: write_outputs(qmodel, example, folder, model_ref))
        inputs = _cpu(verify_inputs) if verify_inputs else example
        outcome.reports = stages.run("verify", lambda: {
            name: verify(result, inputs) for name, result in outcome.results.items()})
        if analyze:
            outcome.sensitivity = stages.run("sensitivity", lambda: _report_sensitivity(qmodel, example))
        if eval_fn is not None:
            outcome.sim_accuracy = stages.run("evaluate (simulation)", lambda: float(eval_fn(qmodel)))
            stages.run("evaluate (runtime)", lambda: _deployed_accuracy(outcome, qmodel, eval_fn))
    finally:
        stages.close()
    return outcome


def quantize_for_backends(
    model: nn.Module,
    backends: Sequence[Any],
    calib: Iterable[Any] | None,
    out_dir: str | Path,
    *,
    eval_fn: EvalFn | None = None,
    forward_loop: ForwardLoop | None = None,
    keep_going: bool = False,
    keep_models: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    report: bool = True,
    **options: Any,
) -> QuantizeSummary:
    """``quantize_for_backend`` for each backend; with ``keep_going`` one backend's error does not stop the rest.
    With ``report``, ``report.json`` and ``report.html`` are written into ``out_dir`` (``mq_core.report``), with the
    sensitivity analysis of the first backend that quantizes.

    Calibration comes from ``calib`` (re-iterable batches) or, when it is None, from ``forward_loop``, which
    ``mq.calibrate`` calls with the prepared model. ``keep_models`` keeps each backend's prepared model in its
    outcome (``mq.quantize`` returns it); otherwise it is dropped once the backend is done, so ``--backend all``
    holds one prepared model at a time.
    """
    if (calib is None) == (forward_loop is None):
        raise ConfigError("pass calibration data or a forward_loop (a function that runs calibration batches "
                          "through the model it is given), exactly one of them.")
    if forward_loop is not None and not callable(forward_loop):
        raise ConfigError(f"forward_loop must be a function taking the model, got a {type(forward_loop).__name__}.")
    if forward_loop is not None and options.get("method"):
        raise ConfigError("a PTQ method reads calibration batches itself, so it needs calibration data; pass it "
                          "(calib_data) instead of, or with a method, rather than a forward_loop.")
    if calib is not None:
        _first_batch(calib)  # an empty source fails before the float model is evaluated
    target = resolve_device(device)
    out = check_writable(out_dir)  # a read-only --out fails now, not after minutes of calibration
    float_accuracy = float(eval_fn(model)) if eval_fn is not None else None
    outcomes = []
    bar = tqdm(backends, desc="backends", unit="backend", leave=False,
               disable=not progress or len(backends) < 2 or not _stderr_is_terminal())
    try:
        for name in bar:
            try:
                analyze = report and not any(o.sensitivity for o in outcomes)
                outcome = quantize_for_backend(model, name, calib, out, eval_fn=eval_fn, forward_loop=forward_loop,
                                               device=target, progress=progress, analyze=analyze, **options)
            except MQError as exc:
                if not keep_going:
                    raise
                log.warning("backend %s failed: %s", getattr(name, "name", name), exc)
                outcome = BackendOutcome(getattr(name, "name", str(name)), error=str(exc))
            if not keep_models:
                outcome.qmodel = None
            outcomes.append(outcome)
    finally:
        bar.close()
    summary = QuantizeSummary(float_accuracy, outcomes, out)
    if report:
        analysed = next((o.sensitivity for o in outcomes if o.sensitivity is not None), None)
        summary.report = write_report(out, summary=summary, sensitivity=analysed,
                                      mixed_precision=summary.mixed_precision,
                                      model=options.get("model_ref") or type(model).__name__)
    return summary
