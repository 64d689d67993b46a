"""verify_layers(): every quantized tensor of every artifact against the simulation, in integer codes.

``verify`` compares outputs. On a deep network that mixes two effects: torch and a runtime sum a convolution in a
different order, a few values land on the other side of a rounding boundary, and each one-step flip feeds every
downstream sum, so end-to-end differences grow with depth although the export is right. This module separates the
two, per artifact and runtime:

* **Through the network**: the artifact runs once with every quantized activation exposed as an extra graph output
  (the output of its DequantizeLinear, located by the node name the canonical export and ``apply_table`` give it:
  ``<tensor>_DequantizeLinear``). Each tensor is turned into codes with the *prepared model's* qparams
  (``round(x / scale) + zero_point``) and compared with the simulation's codes of the same tensor (captured with
  forward hooks on the activation fake quantizers): fraction exact, fraction off by exactly one step, max steps.
  This is the drift: it may grow with depth on a correct export.
* **Locally**: each quantized tensor's *region* (the nodes from the codes of the quantized tensors it reads, i.e.
  their DequantizeLinear, through the op, to its own QuantizeLinear [-> Clip] -> DequantizeLinear; weights with
  their DequantizeLinear included) is fed the *simulation's* codes of its inputs, so both sides start from the
  same integers. Its output codes can then differ only by the runtime's own rounding of one op (a flip of one
  step at most, rare), at any depth; a wrong scale, zero point, rounding, grid or placement in the artifact breaks
  the region that contains it. All regions of an artifact run in one model (each region's nodes copied under a
  suffix, reading the simulation's codes as graph inputs), so the cost is two runs per artifact and runtime.
  Cutting at the codes (not at the dequantized floats) keeps DequantizeLinear -> op -> QuantizeLinear whole, so a
  runtime that fuses them into integer kernels (``onnxruntime-opt``) is checked with those kernels.

The report names, per artifact and runtime, the first tensor in graph order whose local check is more than one
step off, with its op and the quantized tensors its region reads: a mismatch in an upstream tensor's
DequantizeLinear (e.g. its scale) shows in the region of the op right after it. Runtimes run in worker processes
(``mq_core.runtimes.isolation``): one that crashes is a failure of the report, not of mq. Only the prepared model's
qparams judge; the artifact's and the manifest's are never trusted. This report does not change ``verify``'s
verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from mq_core.errors import ConfigError, MQError, VerificationError
from mq_core.export.deploy import deploy_view
from mq_core.export.exporter import ExportResult
from mq_core.pipeline.prepare import as_inputs, prepare_info
from mq_core.pipeline.verify import feeds, run_observed, select_runtimes, trailer
from mq_core.plugins.lookup import get_exporter
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.runtimes import isolation
from mq_core.runtimes.base import Runtime
from mq_core.text import render_table, shorten

log = logging.getLogger(__name__)

#: A local check passes when no code of its tensor is more than this many steps from the simulation's.
LOCAL_TOLERANCE = 1
#: The node that ends a quantized tensor in an artifact, by op type: DequantizeLinear (Q/DQ forms; its input, the
#: codes, is where regions are cut) or OpenVINO's FakeQuantize (its output, the dequantized values, is the cut).
_ENDS = ("DequantizeLinear", "FakeQuantize")
_SUFFIX = "/mq_local_"


@dataclass
class TensorCheck:
    """One quantized tensor of one artifact in one runtime: ``position`` is its place in the artifact's graph
    order; ``exact``/``off_by_one``/``max_steps`` compare the whole artifact's codes with the simulation's;
    ``local_*`` compare its region fed with the simulation's codes (None when the region could not be built);
    ``reads`` names the quantized tensors its region reads."""

    artifact: str
    runtime: str
    position: int
    tensor: str
    op: str
    exact: float
    off_by_one: float
    max_steps: int
    local_exact: float | None
    local_off_by_one: float | None
    local_max_steps: int | None
    reads: list[str] = field(default_factory=list)

    @property
    def local_passed(self) -> bool | None:
        return None if self.local_max_steps is None else self.local_max_steps <= LOCAL_TOLERANCE


@dataclass
class LayerReport:
    """The layer-wise comparison of one export. ``checks`` are in graph order per artifact and runtime;
    ``failures`` holds runs that produced no rows (a runtime that crashed or raised), ``skipped`` runtimes that
    could not run, ``notes`` tensors that could not be compared and why."""

    backend: str
    exporter: str
    checks: list[TensorCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every local check within ``LOCAL_TOLERANCE`` steps and no failed run (the end-to-end drift is
        reported, not judged)."""
        return bool(self.checks) and not self.failures and all(c.local_passed is not False for c in self.checks)

    def first_broken(self) -> dict[tuple[str, str], TensorCheck]:
        """Per (artifact, runtime), the first tensor in graph order whose local check breaks."""
        found: dict[tuple[str, str], TensorCheck] = {}
        for check in self.checks:
            if check.local_passed is False:
                found.setdefault((check.artifact, check.runtime), check)
        return found

    def table(self) -> str:
        """One row per artifact x runtime x quantized tensor, then the first broken op of each run."""
        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}%"

        rows = [[c.artifact, c.runtime, str(c.position), c.tensor, c.op, pct(c.exact), pct(c.off_by_one),
                 str(c.max_steps), pct(c.local_exact),
                 "-" if c.local_max_steps is None else str(c.local_max_steps),
                 {True: "pass", False: "FAIL", None: "-"}[c.local_passed]] for c in self.checks]
        text = render_table(["artifact", "runtime", "#", "tensor", "op", "exact", "1 step", "max steps",
                             "local exact", "local max", "local"], rows)
        broken = self.first_broken()
        for artifact, runtime in dict.fromkeys((c.artifact, c.runtime) for c in self.checks):
            check = broken.get((artifact, runtime))
            if check is None:
                text += f"\n{artifact} in {runtime}: every local check within {LOCAL_TOLERANCE} step"
            else:
                reads = f", reading {', '.join(check.reads)}" if check.reads else ""
                text += (f"\n{artifact} in {runtime}: first op that breaks locally: {check.op} -> tensor "
                         f"{check.tensor!r} ({check.local_max_steps} steps{reads})")
        return text + trailer(self.failures, self.skipped, self.notes)

    def to_dict(self) -> dict[str, Any]:
        broken = self.first_broken()
        return {
            "backend": self.backend, "exporter": self.exporter, "passed": self.passed,
            "local_tolerance": LOCAL_TOLERANCE,
            "checks": [{**asdict(c), "local_passed": c.local_passed} for c in self.checks],
            "first_broken": [{"artifact": a, "runtime": r, "tensor": c.tensor, "op": c.op, "position": c.position}
                             for (a, r), c in broken.items()],
            "failures": list(self.failures), "skipped": list(self.skipped), "notes": list(self.notes),
        }


@dataclass
class _Simulated:
    """One quantized activation of the simulation: its value and the prepared model's qparams."""

    value: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    def codes(self, x: np.ndarray) -> np.ndarray:
        """``round(x / scale) + zero_point`` with these qparams, unclipped (a value off the grid counts its full
        distance in steps)."""
        shape = [1] * x.ndim
        if self.axis is not None and self.scale.size > 1:
            shape[self.axis] = -1
        scale = self.scale.astype(np.float64).reshape(shape)
        zero_point = self.zero_point.astype(np.int64).reshape(shape)
        return np.rint(x.astype(np.float64) / scale).astype(np.int64) + zero_point


def _capture(qmodel: nn.Module, inputs: tuple[Any, ...]) -> tuple[dict[str, _Simulated], list[str | None]]:
    """The simulation's quantized activations by tensor name, and for each model output the tensor that is it
    (None for a float output; ``run_observed``)."""
    captured: dict[str, _Simulated] = {}

    def record(fq: FakeQuantizer, out: torch.Tensor) -> None:
        scale, zero_point = fq.export_qparams()
        captured[fq.tensor] = _Simulated(
            out.detach().float().numpy().copy(), scale.float().numpy(), zero_point.numpy(), fq.ch_axis)

    _, producers = run_observed(qmodel, inputs, record)
    return captured, [None if fq is None else fq.tensor for fq in producers]


def _locate(model: onnx.ModelProto, tensors: Sequence[str], output_tensors: list[str | None]) -> dict[str, int]:
    """Index (graph order) of the node that ends each quantized tensor in ``model`` (``_ENDS``): by the node name
    exporters give it (``<tensor>_DequantizeLinear``, ``<tensor>_FakeQuantize``), or for a quantized graph output
    whose nodes carry the output's name, as the producer of that output."""
    index = {n.name: i for i, n in enumerate(model.graph.node) if n.op_type in _ENDS}
    producers = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    found = {}
    for tensor in tensors:
        position = next((index[f"{tensor}_{end}"] for end in _ENDS if f"{tensor}_{end}" in index), None)
        if position is None and tensor in output_tensors:
            output = model.graph.output[output_tensors.index(tensor)].name \
                if len(model.graph.output) == len(output_tensors) else None
            candidate = producers.get(output) if output else None
            if candidate is not None and model.graph.node[candidate].op_type in _ENDS:
                position = candidate
        if position is not None:
            found[tensor] = position
    return found


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    return {v.name: v.type for v in (*g.value_info, *g.input, *g.output)}


def _value_info(name: str, types: dict[str, onnx.TypeProto], elem_type: int) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto(name=name)
    if name in types and types[name].tensor_type.elem_type != onnx.TensorProto.UNDEFINED:
        info.type.CopyFrom(types[name])
    else:
        info.type.tensor_type.elem_type = elem_type
    return info


def _cut(node: onnx.NodeProto) -> str:
    """Where regions are cut at a quantized tensor that ``node`` ends: a DequantizeLinear's codes, else the
    node's output."""
    return node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]


def _op_of(model: onnx.ModelProto, end: onnx.NodeProto) -> str:
    """The op that produces the float tensor a quantized tensor quantizes (before its Q [-> Clip] -> DQ or its
    FakeQuantize; an Identity that only gives a shared input a name of its own is looked through); ``input`` for a
    graph input."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(end.input[0])
    if end.op_type == "DequantizeLinear":
        if node is not None and node.op_type == "Clip":
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "QuantizeLinear":
            node = producers.get(node.input[0])
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is None:
        return "input"
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def _exposed(model: onnx.ModelProto, names: list[str], types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added as graph outputs (those that are not outputs already)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(_value_info(n, types, onnx.TensorProto.FLOAT) for n in dict.fromkeys(names)
                            if n not in present)
    return out


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _local_model(
    model: onnx.ModelProto, targets: dict[str, int], types: dict[str, onnx.TypeProto], notes: list[str]
) -> tuple[onnx.ModelProto, dict[str, str], dict[str, list[str]], list[str]]:
    """One model holding every target's region (see the module docstring), copied under a suffix each.

    Returns the model, each target's output name in it, each target's list of quantized tensors it reads, and
    the cut tensors (codes) that are its graph inputs besides the original graph inputs it uses.
    """
    graph = model.graph
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    cuts = {_cut(nodes[i]): tensor for tensor, i in targets.items()}
    local = onnx.ModelProto()
    local.CopyFrom(model)
    del local.graph.node[:], local.graph.input[:], local.graph.output[:], local.graph.value_info[:]
    outputs: dict[str, str] = {}
    reads: dict[str, list[str]] = {}
    used_inputs: set[str] = set()
    used_cuts: set[str] = set()
    for k, (tensor, position) in enumerate(targets.items()):
        own = _cut(nodes[position])
        region: set[int] = set()
        region_cuts: set[str] = set()
        region_inputs: set[str] = set()
        stack = [position]
        while stack:
            i = stack.pop()
            if i in region:
                continue
            region.add(i)
            for name in nodes[i].input:
                if not name or name in initializers:
                    continue
                if name in cuts and name != own:
                    region_cuts.add(name)
                elif name in graph_inputs:
                    region_inputs.add(name)
                elif name in producer:
                    stack.append(producer[name])
        if any(_has_subgraph(nodes[i]) for i in region):
            note = f"the region of tensor {tensor!r} holds a node with a subgraph; it has no local check."
            if note not in notes:
                notes.append(note)
            continue
        suffix = f"{_SUFFIX}{k}"
        internal = {o for i in region for o in nodes[i].output}
        for i in sorted(region):
            copy = onnx.NodeProto()
            copy.CopyFrom(nodes[i])
            copy.name = f"{copy.name}{suffix}"
            copy.input[:] = [f"{n}{suffix}" if n in internal else n for n in copy.input]
            copy.output[:] = [f"{n}{suffix}" if n else n for n in copy.output]
            local.graph.node.append(copy)
        outputs[tensor] = f"{nodes[position].output[0]}{suffix}"
        reads[tensor] = sorted((cuts[c] for c in region_cuts), key=lambda t: targets[t])
        used_cuts |= region_cuts
        used_inputs |= region_inputs
    ordered_cuts = sorted(used_cuts, key=lambda c: targets[cuts[c]])
    local.graph.input.extend([*(i for i in graph.input if i.name in used_inputs),
                              *(_value_info(c, types, onnx.TensorProto.UINT8 if nodes[targets[cuts[c]]].op_type
                                            == "DequantizeLinear" else onnx.TensorProto.FLOAT)
                                for c in ordered_cuts)])
    local.graph.output.extend(_value_info(name, {}, onnx.TensorProto.FLOAT) for name in outputs.values())
    return local, outputs, reads, ordered_cuts


def _compare(got: np.ndarray, sim: _Simulated) -> tuple[float, float, int] | None:
    """Fraction exact, fraction one step off, max steps of ``got`` (floats) against the simulation's codes; None
    when the shapes differ."""
    if got.shape != sim.value.shape:
        return None
    if not got.size:
        return 1.0, 0.0, 0
    steps = np.abs(sim.codes(got) - sim.codes(sim.value))
    return float(np.mean(steps == 0)), float(np.mean(steps == 1)), int(steps.max())


def _run_one(report: LayerReport, artifact: str, runtime: Runtime, model: onnx.ModelProto,
             given: dict[str, np.ndarray], simulated: dict[str, _Simulated], output_tensors: list[str | None]) -> None:
    """Both comparisons of one runnable in one runtime, appended to ``report``."""
    located = _locate(model, list(simulated), output_tensors)
    missing = [t for t in simulated if t not in located]
    note = (f"{artifact}: {len(missing)} quantized tensor(s) end in no DequantizeLinear or FakeQuantize of their "
            f"name in the artifact (e.g. inside a fused QLinear op) and are not compared ({shorten(missing)}).")
    if missing and note not in report.notes:
        report.notes.append(note)
    targets = dict(sorted(located.items(), key=lambda item: item[1]))
    if not targets:
        return
    nodes = model.graph.node
    types = _types(model)
    end_outputs = {t: nodes[i].output[0] for t, i in targets.items()}
    exposed = _exposed(model, list(end_outputs.values()), types)
    names = [o.name for o in exposed.graph.output]
    try:
        values = dict(zip(names, isolation.run(runtime, exposed, given,
                                               f"the {artifact} artifact with its quantized tensors exposed")))
    except VerificationError as exc:
        report.failures.append(str(exc))
        return
    local, local_outputs, reads, cut_names = _local_model(model, targets, types, report.notes)
    local_feeds = {name: given[name] for name in (i.name for i in local.graph.input) if name in given}
    cut_tensors = {_cut(nodes[i]): t for t, i in targets.items()}
    for cut in cut_names:
        sim = simulated[cut_tensors[cut]]
        elem = next(i for i in local.graph.input if i.name == cut).type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if np.issubdtype(dtype, np.integer):  # the codes, as the artifact stores them
            info = np.iinfo(dtype)
            local_feeds[cut] = np.clip(sim.codes(sim.value), info.min, info.max).astype(dtype)
        else:  # the dequantized values
            local_feeds[cut] = sim.value.astype(dtype)
    local_values: dict[str, np.ndarray] = {}
    if local_outputs:
        try:
            local_values = dict(zip(list(local_outputs.values()), isolation.run(
                runtime, local, local_feeds, f"the local checks of the {artifact} artifact")))
        except VerificationError as exc:
            report.failures.append(str(exc))
    for position, (tensor, index) in enumerate(targets.items()):
        sim = simulated[tensor]
        whole = _compare(values[end_outputs[tensor]], sim)
        if whole is None:
            report.failures.append(f"{runtime.name}: tensor {tensor!r} of the {artifact} artifact has shape "
                                   f"{tuple(values[end_outputs[tensor]].shape)}, the simulation "
                                   f"{tuple(sim.value.shape)}.")
            continue
        name = local_outputs.get(tensor)
        part = _compare(local_values[name], sim) if name in local_values else None
        report.checks.append(TensorCheck(
            artifact, runtime.name, position, tensor, _op_of(model, nodes[index]), *whole,
            *(part if part is not None else (None, None, None)), reads=reads.get(tensor, []),
        ))


def verify_layers(
    result: ExportResult,
    inputs: Any,
    runtimes: Sequence[str] | str | None = None,
    qmodel: nn.Module | None = None,
) -> LayerReport:
    """Compare every quantized tensor of ``result``'s artifacts with the simulation, through the whole network and
    one region at a time (see the module docstring), in the runtimes ``verify`` would use.

    Args:
        result: from ``mq.export`` (or ``ExportResult.load``).
        inputs: a tensor or tuple of tensors (keep them few: every quantized tensor of every run is held).
        runtimes: as for ``mq.verify`` (names, ``"all"``, or None for the backend's list).
        qmodel: the prepared model to compare with (default: the one ``result`` was exported from).

    The verdict of ``mq.verify`` is unchanged by this report; ``LayerReport.passed`` says whether every local
    check was within one step.
    """
    model = qmodel if qmodel is not None else result.qmodel
    if model is None:
        raise VerificationError("verify_layers needs the prepared model to compare with: pass qmodel=...")
    target = prepare_info(model).target
    tensors = as_inputs(inputs)
    report = LayerReport(result.backend, result.exporter)
    chosen = select_runtimes(target, runtimes, report.skipped)
    runnables = get_exporter(result.exporter).runnables(result)
    for runtime in chosen:
        if runtime.available() and any(runtime.can_run(r.model) for r in runnables):
            isolation.start(runtime)
    try:
        simulated, output_tensors = _capture(model, tensors)
    except MQError:
        raise
    except Exception as exc:
        raise ConfigError(f"the prepared model cannot run on the verification inputs: {type(exc).__name__}: "
                          f"{str(exc)[:300]}. Pass inputs of the shape and dtype the model was prepared with (any "
                          "batch size).") from exc
    for dropped in deploy_view(model).mq_shared_tensors:  # the same tensor as the one kept: compared once
        simulated.pop(dropped, None)
    ran = False
    for runnable in runnables:
        given = feeds(runnable.model, tensors)
        for runtime in chosen:
            if not runtime.available():
                report.skipped.append(f"{runtime.name} is not installed ({runtime.install})")
            elif not runtime.can_run(runnable.model):
                report.skipped.append(f"{runtime.name} cannot run the {runnable.artifact} artifact (custom ops)")
            else:
                ran = True
                _run_one(report, runnable.artifact, runtime, runnable.model, given, simulated, output_tensors)
    if not ran:
        raise VerificationError(f"no runtime could run the {result.exporter} export in {result.out_dir} layer by "
                                f"layer: {'; '.join(report.skipped or ['it has no runnable artifact'])}")
    log.debug("layer-wise verification: %d tensor checks, %d failures", len(report.checks), len(report.failures))
    return report
