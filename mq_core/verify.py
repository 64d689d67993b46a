"""verify(): run exported artifacts in real runtimes and compare with the simulation, in quantization steps.

For each artifact (ranges-file artifacts are rebuilt as Q/DQ ONNX by their exporter) and each runtime that can run
it, every output is compared with the prepared model's output on the same inputs:

* ``max_steps``: max |runtime - simulation| divided by the output's quantization step (its scale when the output
  is quantized; otherwise the step an 8-bit min/max grid over the simulated output would have);
* ``exact``: fraction of elements that are bit-identical;
* pass when ``max_steps <= tolerance`` (default 1 step; a runtime may declare its own, with its reason, e.g.
  OpenVINO's FakeQuantize rounds ties differently). A margin of ``STEP_EPSILON`` absorbs float32 rounding of the
  dequantized values: exactly one code apart can measure 1.0000015 steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mq_core.cli.table import render_table
from mq_core.errors import UnknownNameError, VerificationError
from mq_core.export.exporter import ExportResult
from mq_core.plugins.lookup import get_backend, get_exporter, get_runtime, list_runtimes
from mq_core.prepare import as_inputs
from mq_core.quant.scheme import SCALE_EPS

DEFAULT_TOLERANCE = 1.0
STEP_EPSILON = 1e-3


@dataclass
class OutputCheck:
    """One output of one artifact in one runtime."""

    artifact: str
    runtime: str
    output: str
    max_abs: float
    step: float
    max_steps: float
    exact: float
    passed: bool


@dataclass
class VerificationReport:
    """All checks of one verification; ``passed`` needs at least one check and every check within tolerance."""

    backend: str
    exporter: str
    tolerance: float | None
    checks: list[OutputCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def worst_steps(self) -> float:
        return max((c.max_steps for c in self.checks), default=float("nan"))

    def table(self) -> str:
        """One row per artifact x runtime x output, then skipped runtimes and notes."""
        rows = [[c.artifact, c.runtime, c.output, f"{c.max_steps:.3g}", f"{100 * c.exact:.1f}%", f"{c.max_abs:.3g}",
                 f"{c.step:.3g}", "pass" if c.passed else "FAIL"] for c in self.checks]
        text = render_table(["artifact", "runtime", "output", "max diff (steps)", "exact", "max |diff|", "step",
                             "result"], rows)
        for note in self.skipped:
            text += f"\nskipped: {note}"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "exporter": self.exporter, "tolerance": self.tolerance,
                "passed": self.passed, "checks": [asdict(c) for c in self.checks], "skipped": list(self.skipped),
                "notes": list(self.notes)}


def _flatten(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for o in outputs for t in _flatten(o)]


def simulate(qmodel: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """The prepared model's outputs (eval mode, no grad) as float32 arrays."""
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            return [t.detach().float().numpy() for t in _flatten(qmodel(*inputs))]
    finally:
        qmodel.train(was_training)


def output_step(result: ExportResult, index: int, reference: np.ndarray) -> float:
    """Quantization step of output ``index``: its scale if it is quantized, else that of an 8-bit min/max grid
    over the simulated output."""
    tensor = result.manifest["outputs"][index]["tensor"]
    entry = result.manifest["quantizers"].get(tensor) if tensor else None
    if entry is not None:
        return float(max(np.atleast_1d(entry["scale"])))
    return max(float(reference.max() - reference.min()) / 255.0, SCALE_EPS)


def _runtimes(result: ExportResult, runtimes: Sequence[str] | str | None, report: VerificationReport) -> list[Any]:
    """Runtimes to use. Explicit names must exist; a backend's defaults whose plugin is absent are skipped."""
    if runtimes == "all":
        return [get_runtime(n) for n in list_runtimes()]
    if runtimes is not None:
        return [get_runtime(n) for n in ([runtimes] if isinstance(runtimes, str) else runtimes)]
    chosen = []
    for name in get_backend(result.backend).runtimes:
        try:
            chosen.append(get_runtime(name))
        except UnknownNameError as exc:
            report.skipped.append(str(exc))
    return chosen


def verify(
    result: ExportResult,
    inputs: Any,
    runtimes: Sequence[str] | str | None = None,
    tolerance: float | None = None,
    qmodel: nn.Module | None = None,
) -> VerificationReport:
    """Run ``result``'s artifacts on ``inputs`` in real runtimes and compare with the simulation.

    Args:
        result: from ``mq.export`` (or ``ExportResult.load``).
        inputs: a tensor or tuple of tensors (any batch size).
        runtimes: runtime names, ``"all"`` for every registered runtime, or ``None`` for the backend's own list.
            Runtimes that are not installed or cannot run an artifact are listed in ``report.skipped``.
        tolerance: allowed max difference in quantization steps (default: the runtime's own, else 1 step).
        qmodel: the prepared model to compare with (default: the one ``result`` was exported from).
    """
    model = qmodel if qmodel is not None else result.qmodel
    if model is None:
        raise VerificationError("verify needs the prepared model to compare with: pass qmodel=...")
    tensors = as_inputs(inputs)
    reference = simulate(model, tensors)
    report = VerificationReport(result.backend, result.exporter, tolerance)
    chosen = _runtimes(result, runtimes, report)
    for runnable in get_exporter(result.exporter).runnables(result):
        names = [i.name for i in runnable.model.graph.input]
        feeds = {n: t.detach().float().numpy() for n, t in zip(names, tensors)}
        out_names = [o.name for o in runnable.model.graph.output]
        for runtime in chosen:
            if not runtime.available():
                report.skipped.append(f"{runtime.name} is not installed ({runtime.install})")
                continue
            if not runtime.can_run(runnable.model):
                report.skipped.append(f"{runtime.name} cannot run the {runnable.artifact} artifact (custom ops)")
                continue
            report.notes.extend(n for n in runtime.notes(runnable.model) if n not in report.notes)
            try:
                outputs = runtime.run(runnable.model, feeds)
            except Exception as exc:
                raise VerificationError(
                    f"{runtime.name} failed to run the {runnable.artifact} artifact of {result.out_dir}: "
                    f"{type(exc).__name__}: {str(exc)[:600]}"
                ) from exc
            allowed = tolerance if tolerance is not None else (runtime.tolerance or DEFAULT_TOLERANCE)
            for index, (name, got, ref) in enumerate(zip(out_names, outputs, reference)):
                step = output_step(result, index, ref)
                diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
                max_abs = float(diff.max()) if diff.size else 0.0
                report.checks.append(OutputCheck(
                    runnable.artifact, runtime.name, name, max_abs, step, max_abs / step,
                    float(np.mean(got == ref)) if got.size else 1.0, max_abs / step <= allowed + STEP_EPSILON,
                ))
    if not report.checks:
        raise VerificationError(
            f"no runtime could verify the {result.exporter} export in {result.out_dir}: "
            + "; ".join(report.skipped or ["it has no runnable artifact"])
        )
    return report
