"""verify(): run exported artifacts in real runtimes and compare with the simulation, output by output and op by op.

For each artifact (ranges-file artifacts are rebuilt as Q/DQ ONNX by their exporter) and each runtime that can run
it, every output is compared with the prepared model's output on the same inputs:

* ``max_steps``: max |runtime - simulation| divided by the output's quantization step (its scale when the output
  is quantized; otherwise the step an 8-bit min/max grid over the simulated output would have); ``exact``: the
  fraction of bit-identical elements; ``sqnr_db``: signal to noise of the runtime's output against the
  simulation's; ``top1``: argmax agreement over the last axis for a batch of score vectors.
* The layer-wise report (``verify_layers``, ``report.layers``) runs in the same call: every quantized tensor of
  the artifact is exposed and each op is fed the simulation's own input codes, so its output can differ only by
  that one op's rounding.

The verdict separates noise from error (docs/design.md, "Verification verdict"). A correct deployment of a deep
network drifts: torch and a runtime sum in a different order, a value lands on the other side of a rounding
boundary, and the one-step flip feeds everything downstream. So an output passes when it is within ``tolerance``
steps, or, when it drifted further, when every local check of its artifact and runtime passed and the runtime is
about as close to the simulation as the simulation is to float (``DRIFT_MARGIN_DB``; top-1 at most one row below
float's). Any op that breaks locally fails the verification, whatever
the outputs say. A margin of ``STEP_EPSILON`` absorbs float32 rounding of the dequantized values: exactly one code
apart can measure 1.0000015 steps.

The export being checked cannot vouch for itself: every qparam used for judging (each output's step, each
tensor's codes) comes from the prepared model, never from the manifest, and the manifest's quantizer table and
backend are compared with the prepared model's; any disagreement is a failure of its own (``report.failures``).
Runtimes run in worker processes (``mq_core.runtimes.isolation``), so a runtime that crashes or raises on an
artifact is a failure too, not the end of mq. Inputs reach the runtimes with the dtypes the ONNX graph declares
(int64 token ids stay int64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mq_core.errors import ConfigError, MQError, VerificationError
from mq_core.export.canonical import _tensor_table
from mq_core.export.deploy import deploy_view
from mq_core.export.exporter import ExportResult
from mq_core.export.ranges import QuantTable, TensorQuant
from mq_core.pipeline.prepare import as_inputs, prepare_info
from mq_core.pipeline.runs import feeds, run_float, run_observed, select_runtimes, trailer
from mq_core.pipeline.verify_layers import LayerReport, TensorCheck, check_layers, recorder
from mq_core.plugins.lookup import get_exporter
from mq_core.quant.scheme import SCALE_EPS
from mq_core.runtimes import isolation
from mq_core.text import render_table

DEFAULT_TOLERANCE = 1.0
STEP_EPSILON = 1e-3
#: An output that drifted beyond the tolerance passes only with every local check of its run passed and when the
#: runtime is about as close to the simulation as the simulation is to float: its SQNR against the simulation at
#: most this many dB below the simulation's SQNR against the float model (the prepared model with quantization
#: off), i.e. drift noise at most twice the quantization noise ...
DRIFT_MARGIN_DB = 3.0
#: ... and, for a batch of score vectors (shape [N, C], C > 1, N >= ``TOP1_MIN_ROWS``), argmax agreement with the
#: simulation at most one row below the float model's. Measurements behind the rule: docs/design.md,
#: "Verification verdict".
TOP1_MIN_ROWS = 8
#: Disagreeing tensors named one by one in a report; the rest are counted.
MAX_LISTED = 10


@dataclass
class OutputCheck:
    """One output of one artifact in one runtime. ``sqnr_db``/``top1``: the runtime against the simulation;
    ``quant_sqnr_db``/``quant_top1``: the simulation against float (what quantization itself costs, the yardstick
    for drift). ``within_tolerance``: max steps within the tolerance; ``passed``: that, or drift within the bounds
    with every local check of the run passed; ``verdict`` says which in words."""

    artifact: str
    runtime: str
    output: str
    max_abs: float
    step: float
    max_steps: float
    exact: float
    sqnr_db: float
    top1: float | None
    within_tolerance: bool
    quant_sqnr_db: float = float("inf")
    quant_top1: float | None = None
    passed: bool = False
    verdict: str = ""


@dataclass
class VerificationReport:
    """All checks of one verification. ``passed`` needs at least one output check, every output check passed,
    no failure (``failures`` holds the checks that have no output row: a manifest that disagrees with the
    prepared model, a runtime that crashed or raised on an artifact, one sentence each), and, when the layer-wise
    report ran (``layers``), no op that breaks locally."""

    backend: str
    exporter: str
    tolerance: float | None
    checks: list[OutputCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    layers: LayerReport | None = None

    @property
    def passed(self) -> bool:
        return (bool(self.checks) and all(c.passed for c in self.checks) and not self.failures
                and (self.layers is None or not self.layers.broken))

    @property
    def worst_steps(self) -> float:
        return max((c.max_steps for c in self.checks), default=float("nan"))

    def first_broken(self) -> dict[tuple[str, str], TensorCheck]:
        """Per (artifact, runtime), the first op in graph order whose local check breaks (empty without
        ``layers``)."""
        return {} if self.layers is None else self.layers.first_broken()

    def table(self, layers: bool = False) -> str:
        """One row per artifact x runtime x output, the local-check line of each run (the full layer-wise table
        with ``layers=True``), then failures, skipped runtimes and notes."""
        rows = [[c.artifact, c.runtime, c.output, f"{c.max_steps:.3g}", f"{100 * c.exact:.1f}%", _db(c.sqnr_db),
                 "-" if c.top1 is None else f"{100 * c.top1:.1f}%", "pass" if c.passed else "FAIL", c.verdict]
                for c in self.checks]
        text = render_table(["artifact", "runtime", "output", "max diff (steps)", "exact", "SQNR", "top-1",
                             "result", "why"], rows)
        if self.layers is not None:
            if layers:
                text += "\n\nLayer-wise (codes of every quantized tensor; local: its op fed the simulation's codes):\n"
                text += self.layers.table()
            else:
                text += "".join(f"\n{line}" for line in self.layers.verdict_lines())
                text += trailer(self.layers.failures, [], self.layers.notes)
        return text + trailer(self.failures, self.skipped, self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "exporter": self.exporter, "tolerance": self.tolerance,
                "passed": self.passed, "checks": [asdict(c) for c in self.checks], "failures": list(self.failures),
                "skipped": list(self.skipped), "notes": list(self.notes),
                "bounds": {"drift_margin_db": DRIFT_MARGIN_DB, "top1_min_rows": TOP1_MIN_ROWS},
                "layers": None if self.layers is None else self.layers.to_dict()}


def _db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f} dB"


def sqnr_db(got: np.ndarray, reference: np.ndarray) -> float:
    """Signal to noise of ``got`` against ``reference`` in dB (inf when identical)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((got.astype(np.float64) - ref) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(float(np.sum(ref ** 2)), 1e-300) / noise))


def top1_agreement(got: np.ndarray, reference: np.ndarray) -> float | None:
    """Argmax agreement over the last axis for a batch of score vectors (shape [N, C], C > 1, N >=
    ``TOP1_MIN_ROWS``: with fewer rows one near-tie would decide the fraction); None for other outputs."""
    if reference.ndim != 2 or reference.shape[1] < 2 or reference.shape[0] < TOP1_MIN_ROWS:
        return None
    return float(np.mean(np.argmax(got, axis=1) == np.argmax(reference, axis=1)))


def simulate(qmodel: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[list[np.ndarray], list[float | None]]:
    """The prepared model's outputs as float32 arrays, and each output's step: the scale of the activation
    quantizer that produced it (None for an output no quantizer produced, a float output; see ``run_observed``)."""
    outputs, producers = run_observed(qmodel, inputs)
    steps = [None if fq is None else float(fq.export_qparams()[0].max()) for fq in producers]
    return [t.detach().float().numpy() for t in outputs], steps


def output_step(quantized_step: float | None, reference: np.ndarray) -> float:
    """Quantization step of an output: its quantizer's scale if it is quantized, else that of an 8-bit min/max grid
    over the simulated output."""
    if quantized_step is not None:
        return quantized_step
    return max(float(reference.max() - reference.min()) / 255.0, SCALE_EPS)


def inputs_like(loaded: Any, specs: list[dict[str, Any]], source: str) -> tuple[torch.Tensor, ...]:
    """Verification inputs read from a file, checked against the inputs a checkpoint records (``shape``, ``dtype``;
    the batch dimension may differ) before anything runs, and cast to the recorded dtype: any real tensor for a
    float input (numpy's float64 becomes float32), integer tensors only for an integer input (token ids are never
    truncated from floats)."""
    tensors = (loaded,) if isinstance(loaded, torch.Tensor) else loaded
    expected = ", ".join(f"[N, {', '.join(str(d) for d in s['shape'][1:])}] {s['dtype']}".replace("[N, ]", "[N]")
                         for s in specs)
    wanted = f"the checkpoint's model takes {len(specs)} input(s): {expected}"
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ConfigError(f"{source} holds a {type(loaded).__name__}, not a tensor or a tuple of tensors; {wanted}.")
    if len(tensors) != len(specs):
        raise ConfigError(f"{source} holds {len(tensors)} tensors, but {wanted}.")
    out = []
    for index, (tensor, spec) in enumerate(zip(tensors, specs)):
        dtype = getattr(torch, spec["dtype"])
        label = f"{source}" if len(specs) == 1 else f"input {index} of {source}"
        if tensor.dim() != len(spec["shape"]) or list(tensor.shape[1:]) != list(spec["shape"][1:]):
            raise ConfigError(f"{label} has shape {list(tensor.shape)}, but {wanted} (any batch size N). Save "
                              "samples of the shape the model was prepared with.")
        if not dtype.is_floating_point and (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
            raise ConfigError(f"{label} holds {tensor.dtype} values, but {wanted}; save the integer values (e.g. "
                              "token ids) as an integer array.")
        out.append(tensor.to(dtype))
    return tuple(out)


def checkpoint_table(qmodel: nn.Module) -> QuantTable:
    """The ranges table of the prepared model itself, keyed like a manifest's ``quantizers`` (what an honest
    export of this model records)."""
    return _tensor_table(deploy_view(qmodel))


def _differences(recorded: TensorQuant, actual: TensorQuant) -> list[str]:
    diffs = [f"{name} {getattr(recorded, name)!r} in the manifest, {getattr(actual, name)!r} in the checkpoint"
             for name in ("kind", "bits", "signed", "symmetric", "qmin", "qmax", "axis")
             if getattr(recorded, name) != getattr(actual, name)]
    for name, dtype in (("scale", np.float32), ("zero_point", np.int64)):
        a = np.atleast_1d(getattr(recorded, name)).astype(dtype)
        b = np.atleast_1d(getattr(actual, name)).astype(dtype)
        if a.shape != b.shape:
            diffs.append(f"{name} has {a.size} value(s) in the manifest, {b.size} in the checkpoint")
        elif not np.array_equal(a, b):
            i = int(np.flatnonzero(a != b)[0]) if np.any(a != b) else 0
            where = f"[{i}]" if a.size > 1 else ""
            diffs.append(f"{name}{where} {a[i]:.6g} in the manifest, {b[i]:.6g} in the checkpoint")
    return diffs


def manifest_disagreements(manifest: dict[str, Any], table: QuantTable) -> list[str]:
    """Each tensor whose qparams in the manifest differ from ``table`` (the prepared model's), or that only one of
    them quantizes, as one sentence; more than ``MAX_LISTED`` are counted, not listed."""
    try:
        recorded = {name: TensorQuant.from_dict(entry) for name, entry in manifest["quantizers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"the manifest's quantizer table is unreadable ({type(exc).__name__}: {exc}); it cannot be compared "
                "with the checkpoint."]
    found = []
    for name in sorted(set(recorded) | set(table)):
        if name not in table:
            found.append(f"the manifest lists quantized tensor {name!r}, which the checkpoint does not quantize.")
        elif name not in recorded:
            found.append(f"the checkpoint quantizes tensor {name!r}, which the manifest does not list.")
        else:
            diffs = _differences(recorded[name], table[name])
            if diffs:
                found.append(f"the manifest disagrees with the checkpoint on tensor {name!r}: {'; '.join(diffs)}.")
    if len(found) > MAX_LISTED:
        found[MAX_LISTED:] = [f"... and {len(found) - MAX_LISTED} more tensors disagree; is this the checkpoint the "
                              "export was made from?"]
    return found


def _compare(report: VerificationReport, artifact: str, runtime: str, names: list[str], outputs: list[np.ndarray],
             reference: list[np.ndarray], steps: list[float | None], allowed: float,
             floats: list[np.ndarray] | None) -> None:
    """One output check per output (judged later by ``_judge``); an artifact whose outputs differ in number or
    shape fails outright (a missing output must not go unchecked, and broadcasting would compare the wrong
    elements)."""
    if len(outputs) != len(reference):
        report.failures.append(f"{runtime}: the {artifact} artifact has {len(outputs)} output(s), the prepared model "
                               f"{len(reference)}.")
        return
    for index, (name, got, ref, quantized) in enumerate(zip(names, outputs, reference, steps)):
        if got.shape != ref.shape:
            report.failures.append(f"{runtime}: output {name!r} of the {artifact} artifact has shape "
                                   f"{tuple(got.shape)}, the simulation {tuple(ref.shape)}.")
            continue
        step = output_step(quantized, ref)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        report.checks.append(OutputCheck(
            artifact, runtime, name, max_abs, step, max_abs / step, float(np.mean(got == ref)) if got.size else 1.0,
            sqnr_db(got, ref), top1_agreement(got, ref), max_abs / step <= allowed + STEP_EPSILON,
            *((sqnr_db(ref, floats[index]), top1_agreement(ref, floats[index])) if floats is not None else ()),
        ))


def _beyond(check: OutputCheck, rows: int) -> str:
    """Why drift exceeds the bounds (``DRIFT_MARGIN_DB``, top-1 one row below float's), or '' when it does not."""
    bound = check.quant_sqnr_db - DRIFT_MARGIN_DB
    reasons = []
    if check.sqnr_db < bound:
        reasons.append(f"SQNR against the simulation {_db(check.sqnr_db)} < {bound:.1f} dB (quantization's own "
                       f"{_db(check.quant_sqnr_db)} - {DRIFT_MARGIN_DB:g})")
    if check.top1 is not None and check.quant_top1 is not None and check.top1 < check.quant_top1 - 1.0 / rows - 1e-9:
        reasons.append(f"top-1 agreement {100 * check.top1:.1f}% < float's {100 * check.quant_top1:.1f}% "
                       "less one row")
    return "; ".join(reasons)


def _judge(report: VerificationReport, allowed: dict[str, float], rows: dict[str, int]) -> None:
    """Each output check's verdict: within the tolerance; or drifted, which is noise only when every local check
    of its run passed and the drift is within the bounds (``_beyond``)."""
    for check in report.checks:
        if check.within_tolerance:
            check.passed, check.verdict = True, f"within {allowed[check.runtime]:g} step"
            continue
        beyond = _beyond(check, rows.get(check.output, 1))
        if report.layers is None:
            check.passed = False
            check.verdict = "beyond the tolerance (the layer-wise check that tells drift from error did not run)"
        elif not report.layers.local_ok(check.artifact, check.runtime):
            check.passed = False
            check.verdict = ("beyond the tolerance, and an op breaks locally (see below)"
                             if report.layers.first_broken().get((check.artifact, check.runtime))
                             else "beyond the tolerance, and no local check ran to tell drift from error")
        elif beyond:
            check.passed, check.verdict = False, f"drift beyond the bounds: {beyond}"
        else:
            check.passed, check.verdict = True, "drift: every local check passes"


def verify(
    result: ExportResult,
    inputs: Any,
    runtimes: Sequence[str] | str | None = None,
    tolerance: float | None = None,
    qmodel: nn.Module | None = None,
    layers: bool = True,
) -> VerificationReport:
    """Run ``result``'s artifacts on ``inputs`` in real runtimes and compare with the simulation.

    Args:
        result: from ``mq.export`` (or ``ExportResult.load``).
        inputs: a tensor or tuple of tensors (any batch size), in the dtypes the model takes.
        runtimes: runtime names (or Runtime objects), ``"all"`` for every registered runtime, or ``None`` for the
            backend's own list. Runtimes that are not installed or cannot run an artifact are listed in
            ``report.skipped``; one that crashes or raises on an artifact is in ``report.failures``.
        tolerance: allowed max difference in quantization steps (default: the runtime's own, else 1 step).
        qmodel: the prepared model to compare with (default: the one ``result`` was exported from). It is the
            reference for everything judged: outputs, steps, codes, and the manifest's qparams and backend.
        layers: also run the layer-wise check (``report.layers``; two more runs per artifact and runtime). Without
            it an output passes only within ``tolerance``: drift cannot be told from error.
    """
    model = qmodel if qmodel is not None else result.qmodel
    if model is None:
        raise VerificationError("verify needs the prepared model to compare with: pass qmodel=...")
    target = prepare_info(model).target
    tensors = as_inputs(inputs, model)
    report = VerificationReport(result.backend, result.exporter, tolerance)
    chosen = select_runtimes(target, runtimes, report.skipped)
    runnables = get_exporter(result.exporter).runnables(result)
    for runtime in chosen:  # the workers that will be used load while the simulation runs
        if runtime.available() and any(runtime.can_run(r.model) for r in runnables):
            isolation.start(runtime)
    simulated, record = recorder(model) if layers else ({}, None)
    try:
        outputs, producers = run_observed(model, tensors, record)
    except MQError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors if isinstance(t, torch.Tensor))
        raise ConfigError(f"the prepared model cannot run on the verification inputs ({shapes}): "
                          f"{type(exc).__name__}: {str(exc)[:300]}. Pass inputs of the shape and dtype the model "
                          "was prepared with (any batch size).") from exc
    reference = [t.detach().float().numpy() for t in outputs]
    floats = [t.detach().float().numpy() for t in run_float(model, tensors)] if layers else None
    quantized_steps = [None if fq is None else float(fq.export_qparams()[0].max()) for fq in producers]
    output_tensors = [None if fq is None else fq.tensor for fq in producers]
    if layers:
        report.layers = LayerReport(result.backend, result.exporter)
    if result.backend != target.name:
        report.failures.append(f"the export was made for backend {result.backend!r} but the checkpoint was prepared "
                               f"for {target.name!r}.")
    report.failures.extend(manifest_disagreements(result.manifest, checkpoint_table(model)))
    ran = False
    allowed: dict[str, float] = {}
    rows: dict[str, int] = {}
    for runnable in runnables:
        given = feeds(runnable.model, tensors)
        out_names = [o.name for o in runnable.model.graph.output]
        for runtime in chosen:
            if not runtime.available():
                report.skipped.append(f"{runtime.name} is not installed ({runtime.install})")
                continue
            if not runtime.can_run(runnable.model):
                report.skipped.append(f"{runtime.name} cannot run the {runnable.artifact} artifact (custom ops)")
                continue
            report.notes.extend(n for n in runtime.notes(runnable.model) if n not in report.notes)
            ran = True
            try:
                got = isolation.run(runtime, runnable.model, given, f"the {runnable.artifact} artifact")
            except VerificationError as exc:
                report.failures.append(str(exc))
                continue
            allowed[runtime.name] = tolerance if tolerance is not None else (runtime.tolerance or DEFAULT_TOLERANCE)
            _compare(report, runnable.artifact, runtime.name, out_names, got, reference, quantized_steps,
                     allowed[runtime.name], floats)
            rows.update((name, ref.shape[0] if ref.ndim else 1) for name, ref in zip(out_names, reference))
            if report.layers is not None:
                check_layers(report.layers, runnable.artifact, runtime, runnable.model, given, simulated,
                             output_tensors)
    if not ran:
        raise VerificationError(
            f"no runtime could verify the {result.exporter} export in {result.out_dir}: "
            + "; ".join(report.skipped or ["it has no runnable artifact"])
        )
    _judge(report, allowed, rows)
    return report
