"""verify(): run exported artifacts in real runtimes and compare with the simulation, in quantization steps.

For each artifact (ranges-file artifacts are rebuilt as Q/DQ ONNX by their exporter) and each runtime that can run
it, every output is compared with the prepared model's output on the same inputs:

* ``max_steps``: max |runtime - simulation| divided by the output's quantization step (its scale when the output
  is quantized; otherwise the step an 8-bit min/max grid over the simulated output would have);
* ``exact``: fraction of elements that are bit-identical;
* pass when ``max_steps <= tolerance`` (default 1 step; a runtime may declare its own, with its reason, e.g.
  OpenVINO's FakeQuantize rounds ties differently). A margin of ``STEP_EPSILON`` absorbs float32 rounding of the
  dequantized values: exactly one code apart can measure 1.0000015 steps.

The export being checked cannot vouch for itself: every qparam used for judging (each output's step) comes from
the prepared model, never from the manifest, and the manifest's quantizer table and backend are compared with the
prepared model's; any disagreement is a failure of its own (``report.failures``). Runtimes run in worker processes
(``mq_core.runtimes.isolation``), so a runtime that crashes or raises on an artifact is a failure too, not the end
of mq. Inputs reach the runtimes with the dtypes the ONNX graph declares (int64 token ids stay int64).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError, MQError, UnknownNameError, VerificationError
from mq_core.export.canonical import _tensor_table
from mq_core.export.deploy import deploy_view
from mq_core.export.exporter import ExportResult
from mq_core.export.ranges import QuantTable, TensorQuant
from mq_core.pipeline.prepare import as_inputs, prepare_info
from mq_core.plugins.lookup import get_exporter, get_runtime, list_runtimes
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.scheme import SCALE_EPS
from mq_core.quant.switches import quantizers
from mq_core.runtimes import isolation
from mq_core.runtimes.base import Runtime
from mq_core.text import render_table

DEFAULT_TOLERANCE = 1.0
STEP_EPSILON = 1e-3
#: Disagreeing tensors named one by one in a report; the rest are counted.
MAX_LISTED = 10


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
    """All checks of one verification. ``passed`` needs at least one output check, every output check within
    tolerance, and no failure: ``failures`` holds the checks that have no output row (a manifest that disagrees
    with the prepared model, a runtime that crashed or raised on an artifact), one sentence each."""

    backend: str
    exporter: str
    tolerance: float | None
    checks: list[OutputCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.failures

    @property
    def worst_steps(self) -> float:
        return max((c.max_steps for c in self.checks), default=float("nan"))

    def table(self) -> str:
        """One row per artifact x runtime x output, then failures, skipped runtimes and notes."""
        rows = [[c.artifact, c.runtime, c.output, f"{c.max_steps:.3g}", f"{100 * c.exact:.1f}%", f"{c.max_abs:.3g}",
                 f"{c.step:.3g}", "pass" if c.passed else "FAIL"] for c in self.checks]
        text = render_table(["artifact", "runtime", "output", "max diff (steps)", "exact", "max |diff|", "step",
                             "result"], rows)
        return text + trailer(self.failures, self.skipped, self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "exporter": self.exporter, "tolerance": self.tolerance,
                "passed": self.passed, "checks": [asdict(c) for c in self.checks], "failures": list(self.failures),
                "skipped": list(self.skipped), "notes": list(self.notes)}


def trailer(failures: Sequence[str], skipped: Sequence[str], notes: Sequence[str]) -> str:
    """The lines under a report's table: failed checks that have no row, skipped runtimes, notes."""
    return "".join([*(f"\nFAIL: {f}" for f in failures), *(f"\nskipped: {s}" for s in skipped),
                    *(f"\nnote: {n}" for n in notes)])


def _flatten(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for o in outputs for t in _flatten(o)]


def run_observed(
    qmodel: nn.Module, inputs: Sequence[Any], on_quantized: Callable[[FakeQuantizer, torch.Tensor], None] | None = None
) -> tuple[list[torch.Tensor], list[FakeQuantizer | None]]:
    """Run the prepared model (eval mode, no grad) and tell which activation quantizer produced each output.

    Returns the flattened outputs and, per output, the enabled activation quantizer whose output it is (None for a
    float output). The producer is found by identity (a forward hook keeps a weak reference to each quantizer's
    output), so the qparams that judge an output are the prepared model's own, whatever an export's files claim.
    ``on_quantized(fq, out)`` sees every enabled activation quantizer's output as it is computed.
    """
    produced: dict[int, tuple[weakref.ref[torch.Tensor], FakeQuantizer]] = {}

    def record(fq: nn.Module, _args: Any, out: torch.Tensor) -> None:
        if isinstance(fq, FakeQuantizer) and fq.quant_enabled.item():
            produced[id(out)] = (weakref.ref(out), fq)
            if on_quantized is not None:
                on_quantized(fq, out)

    hooks = [fq.register_forward_hook(record) for fq in quantizers(qmodel, weights=False).values()]
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            outputs = _flatten(qmodel(*inputs))
    finally:
        qmodel.train(was_training)
        for hook in hooks:
            hook.remove()
    producers: list[FakeQuantizer | None] = []
    for t in outputs:
        ref, fq = produced.get(id(t), (None, None))
        producers.append(fq if ref is not None and ref() is t else None)
    return outputs, producers


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


def feeds(model: onnx.ModelProto, inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The runtime feeds of ``model`` from tensors, each in the dtype its graph input declares (int64 token ids
    stay int64; a float64 array becomes the float32 the graph reads), else in the tensor's own dtype."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    out = {}
    for graph_input, tensor in zip(graph_inputs, inputs):
        array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        elem_type = graph_input.type.tensor_type.elem_type
        if elem_type != onnx.TensorProto.UNDEFINED:
            array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type), copy=False)
        out[graph_input.name] = np.ascontiguousarray(array)
    return out


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


def select_runtimes(backend: Backend, runtimes: Sequence[str] | str | None, skipped: list[str]) -> list[Runtime]:
    """The runtimes that run ``backend``'s artifacts: every registered one for ``"all"``, the given names or Runtime
    objects (each must exist: ``UnknownNameError``), or by default the backend's own list, where a runtime whose
    plugin is not installed is left out with the reason appended to ``skipped``. Whether a runtime is available
    and can run a given artifact is the caller's question (``Runtime.available``, ``Runtime.can_run``)."""
    if runtimes == "all":
        return [get_runtime(n) for n in list_runtimes()]
    if runtimes is not None:
        return [get_runtime(n) for n in ([runtimes] if isinstance(runtimes, str) else runtimes)]
    chosen = []
    for name in backend.runtimes:
        try:
            chosen.append(get_runtime(name))
        except UnknownNameError as exc:
            skipped.append(str(exc))
    return chosen


def _compare(report: VerificationReport, artifact: str, runtime: str, names: list[str], outputs: list[np.ndarray],
             reference: list[np.ndarray], steps: list[float | None], allowed: float) -> None:
    """One output check per output; an artifact whose outputs differ in number or shape fails outright (a missing
    output must not go unchecked, and broadcasting would compare the wrong elements)."""
    if len(outputs) != len(reference):
        report.failures.append(f"{runtime}: the {artifact} artifact has {len(outputs)} output(s), the prepared model "
                               f"{len(reference)}.")
        return
    for name, got, ref, quantized in zip(names, outputs, reference, steps):
        if got.shape != ref.shape:
            report.failures.append(f"{runtime}: output {name!r} of the {artifact} artifact has shape "
                                   f"{tuple(got.shape)}, the simulation {tuple(ref.shape)}.")
            continue
        step = output_step(quantized, ref)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        report.checks.append(OutputCheck(
            artifact, runtime, name, max_abs, step, max_abs / step, float(np.mean(got == ref)) if got.size else 1.0,
            max_abs / step <= allowed + STEP_EPSILON,
        ))


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
        inputs: a tensor or tuple of tensors (any batch size), in the dtypes the model takes.
        runtimes: runtime names (or Runtime objects), ``"all"`` for every registered runtime, or ``None`` for the
            backend's own list. Runtimes that are not installed or cannot run an artifact are listed in
            ``report.skipped``; one that crashes or raises on an artifact is in ``report.failures``.
        tolerance: allowed max difference in quantization steps (default: the runtime's own, else 1 step).
        qmodel: the prepared model to compare with (default: the one ``result`` was exported from). It is the
            reference for everything judged: outputs, steps, and the manifest's qparams and backend.
    """
    model = qmodel if qmodel is not None else result.qmodel
    if model is None:
        raise VerificationError("verify needs the prepared model to compare with: pass qmodel=...")
    target = prepare_info(model).target
    tensors = as_inputs(inputs)
    report = VerificationReport(result.backend, result.exporter, tolerance)
    chosen = select_runtimes(target, runtimes, report.skipped)
    runnables = get_exporter(result.exporter).runnables(result)
    for runtime in chosen:  # the workers that will be used load while the simulation runs
        if runtime.available() and any(runtime.can_run(r.model) for r in runnables):
            isolation.start(runtime)
    try:
        reference, quantized_steps = simulate(model, tensors)
    except MQError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors if isinstance(t, torch.Tensor))
        raise ConfigError(f"the prepared model cannot run on the verification inputs ({shapes}): "
                          f"{type(exc).__name__}: {str(exc)[:300]}. Pass inputs of the shape and dtype the model "
                          "was prepared with (any batch size).") from exc
    if result.backend != target.name:
        report.failures.append(f"the export was made for backend {result.backend!r} but the checkpoint was prepared "
                               f"for {target.name!r}.")
    report.failures.extend(manifest_disagreements(result.manifest, checkpoint_table(model)))
    ran = False
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
                outputs = isolation.run(runtime, runnable.model, given, f"the {runnable.artifact} artifact")
            except VerificationError as exc:
                report.failures.append(str(exc))
                continue
            allowed = tolerance if tolerance is not None else (runtime.tolerance or DEFAULT_TOLERANCE)
            _compare(report, runnable.artifact, runtime.name, out_names, outputs, reference, quantized_steps,
                     allowed)
    if not ran:
        raise VerificationError(
            f"no runtime could verify the {result.exporter} export in {result.out_dir}: "
            + "; ".join(report.skipped or ["it has no runnable artifact"])
        )
    return report
