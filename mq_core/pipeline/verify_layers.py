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
from collections.abc import Callable, Sequence
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
from mq_core.pipeline.runs import feeds, run_observed, select_runtimes, trailer
from mq_core.plugins.lookup import get_exporter
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.runtimes import isolation
from mq_core.runtimes.base import Runtime
from mq_core.text import render_table, shorten

log = logging.getLogger(__name__)

#: A local check passes when no code of its tensor is more than this many steps from the simulation's ...
LOCAL_TOLERANCE = 1
#: ... and at least this fraction of its codes are exactly the simulation's, or at most ``LOCAL_MAX_MISMATCHES``
#: codes differ (a small tensor may hold one rare flip). A correct export's op differs from torch only where a
#: float sum lands on the other side of a rounding boundary: measured >= 99.99% exact on ResNet-18- and
#: MobileNetV2-shaped models in every runtime (docs/design.md, "Verification verdict"). A zero point off by one in a
#: DequantizeLinear is one step everywhere: only the fraction catches it.
LOCAL_MIN_EXACT = 0.99
LOCAL_MAX_MISMATCHES = 2
#: A quantizer input within this fraction of a step of a .5 tie counts as at the tie: a runtime that computes the
#: grid position with other float arithmetic (OpenVINO's ``(x - lo) / (hi - lo) * (levels - 1)``) lands a few ulps
#: on either side of it.
TIE_WIDTH = 1e-3
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
    elements: int = 0

    @property
    def local_passed(self) -> bool | None:
        """Within ``LOCAL_TOLERANCE`` steps and exact on ``LOCAL_MIN_EXACT`` of the codes (or all but
        ``LOCAL_MAX_MISMATCHES``); None when the tensor has no local check."""
        if self.local_max_steps is None or self.local_exact is None:
            return None
        mismatches = round((1.0 - self.local_exact) * self.elements)
        return self.local_max_steps <= LOCAL_TOLERANCE and (
            self.local_exact >= LOCAL_MIN_EXACT or mismatches <= LOCAL_MAX_MISMATCHES)


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
        """At least one tensor compared, every local check passed (``TensorCheck.local_passed``) and no failed
        run. The drift through the network is reported here and judged by ``verify``."""
        return bool(self.checks) and not self.broken

    @property
    def broken(self) -> bool:
        """A failed run or a local check that broke: what makes ``verify`` fail whatever its outputs say."""
        return bool(self.failures) or any(c.local_passed is False for c in self.checks)

    def local_ok(self, artifact: str, runtime: str) -> bool:
        """Whether ``artifact`` in ``runtime`` had local checks and every one passed: the condition under which
        ``verify`` reads end-to-end drift as noise."""
        local = [c.local_passed for c in self.checks if c.artifact == artifact and c.runtime == runtime]
        return any(p is not None for p in local) and all(p is not False for p in local)

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
        return text + "\n" + "\n".join(self.verdict_lines()) + trailer(self.failures, self.skipped, self.notes)

    def verdict_lines(self) -> list[str]:
        """Per artifact and runtime, one line: every local check passed, or the first op that breaks locally with
        its tensor, its steps and exact fraction, and the quantized tensors its region reads."""
        broken = self.first_broken()
        lines = []
        for artifact, runtime in dict.fromkeys((c.artifact, c.runtime) for c in self.checks):
            check = broken.get((artifact, runtime))
            if check is None:
                count = sum(c.local_passed is not None for c in self.checks
                            if c.artifact == artifact and c.runtime == runtime)
                lines.append(f"{artifact} in {runtime}: all {count} local checks pass (<= {LOCAL_TOLERANCE} step, "
                             f">= {100 * LOCAL_MIN_EXACT:g}% exact)")
            else:
                reads = f", reading {', '.join(check.reads)}" if check.reads else ""
                lines.append(f"{artifact} in {runtime}: first op that breaks locally: {check.op} -> tensor "
                             f"{check.tensor!r} ({check.local_max_steps} steps, {100 * (check.local_exact or 0):.1f}% "
                             f"exact{reads})")
        return lines

    def summary_lines(self) -> list[str]:
        """Per artifact and runtime, one short line: local checks passed out of those run, the first op that breaks
        locally (or none), and the first tensor that drifts through the network."""
        broken = self.first_broken()
        lines = []
        for artifact, runtime in dict.fromkeys((c.artifact, c.runtime) for c in self.checks):
            run = [c for c in self.checks if c.artifact == artifact and c.runtime == runtime]
            local = [c for c in run if c.local_passed is not None]
            check = broken.get((artifact, runtime))
            first = (f"first op that breaks: {check.op} -> {check.tensor!r} ({check.local_max_steps} steps, "
                     f"{100 * (check.local_exact or 0):.1f}% exact)") if check else "no op breaks"
            drift = next((c for c in run if c.exact < 1.0), None)
            drifts = (f"; drift from {drift.tensor!r} on, {100 * run[-1].exact:.0f}% exact at {run[-1].tensor!r}"
                      if drift else "; bit-exact through the network")
            lines.append(f"{artifact} in {runtime}: {sum(bool(c.local_passed) for c in local)}/{len(local)} local "
                         f"checks pass, {first}{drifts}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        broken = self.first_broken()
        return {
            "backend": self.backend, "exporter": self.exporter, "passed": self.passed,
            "local_tolerance": LOCAL_TOLERANCE, "local_min_exact": LOCAL_MIN_EXACT,
            "checks": [{**asdict(c), "local_passed": c.local_passed} for c in self.checks],
            "first_broken": [{"artifact": a, "runtime": r, "tensor": c.tensor, "op": c.op, "position": c.position}
                             for (a, r), c in broken.items()],
            "failures": list(self.failures), "skipped": list(self.skipped), "notes": list(self.notes),
        }


@dataclass
class _Simulated:
    """One quantized activation of the simulation: its value, the prepared model's qparams, and where its
    quantizer's input sat on a .5 tie of the grid (``ties``, within ``TIE_WIDTH``)."""

    value: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    ties: np.ndarray

    def _shape(self, ndim: int) -> list[int]:
        shape = [1] * ndim
        if self.axis is not None and self.scale.size > 1:
            shape[self.axis] = -1
        return shape

    def codes(self, x: np.ndarray) -> np.ndarray:
        """``round(x / scale) + zero_point`` with these qparams, unclipped (a value off the grid counts its full
        distance in steps)."""
        shape = self._shape(x.ndim)
        scale = self.scale.astype(np.float64).reshape(shape)
        zero_point = self.zero_point.astype(np.int64).reshape(shape)
        return np.rint(x.astype(np.float64) / scale).astype(np.int64) + zero_point

    @classmethod
    def of(cls, fq: FakeQuantizer, x: torch.Tensor, out: torch.Tensor) -> _Simulated:
        scale, zero_point = fq.export_qparams()
        sim = cls(out.detach().float().numpy().copy(), scale.float().numpy(), zero_point.numpy(), fq.ch_axis,
                  np.zeros(0, dtype=bool))
        if x.shape == out.shape:  # x / scale as the quantizer divides, in float32
            scaled = x.detach().float().numpy() / sim.scale.astype(np.float32).reshape(sim._shape(x.dim()))
            sim.ties = np.abs(scaled - np.floor(scaled) - np.float32(0.5)) <= TIE_WIDTH
        return sim


def recorder(qmodel: nn.Module) -> tuple[dict[str, _Simulated], Callable[[FakeQuantizer, torch.Tensor], None]]:
    """A dict that fills, by tensor name, with the simulation's quantized activations, and the ``run_observed``
    callback that fills it. A tensor the deploy view drops as a duplicate of another is not recorded: it is the
    same tensor as the one kept, compared once."""
    captured: dict[str, _Simulated] = {}
    shared = set(deploy_view(qmodel).mq_shared_tensors)

    def record(fq: FakeQuantizer, x: torch.Tensor, out: torch.Tensor) -> None:
        if fq.tensor not in shared:
            captured[fq.tensor] = _Simulated.of(fq, x, out)

    return captured, record


def _locate(model: onnx.ModelProto, tensors: Sequence[str], output_tensors: list[str | None]) -> dict[str, int]:
    """Index (graph order) of the node that ends each quantized tensor in ``model`` (``_ENDS``): by the node name
    exporters give it (``<tensor>_DequantizeLinear``, ``<tensor>_FakeQuantize``), or for a quantized graph output
    whose nodes carry the output's name, as the producer of that output; a tensor that only lives as codes between
    fused integer ops (QLinearConv -> QLinearConv) ends at the node writing ``<tensor>_quantized``."""
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
        if position is None:  # inside fused integer ops (QOperator form): the node that writes its codes
            candidate = producers.get(f"{tensor}_quantized")
            if candidate is not None and _quantizes(model.graph.node[candidate]):
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
    node's output (FakeQuantize's grid values, or the codes a quantizing node writes)."""
    return node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]


def _op_of(model: onnx.ModelProto, end: onnx.NodeProto) -> str:
    """The op that produces the float tensor a quantized tensor quantizes (before its Q [-> Clip] -> DQ or its
    FakeQuantize; an Identity that only gives a shared input a name of its own is looked through); ``input`` for a
    graph input."""
    producers = {o: n for n in model.graph.node for o in n.output}
    if end.op_type.startswith("QLinear") or end.op_type == "QGemm":
        return f"{end.op_type} {end.name}"
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


def _quantizes(node: onnx.NodeProto) -> bool:
    """Whether ``node`` writes a quantized tensor's codes (or FakeQuantize's grid values)."""
    return node.op_type in ("QuantizeLinear", "FakeQuantize", "QGemm") or node.op_type.startswith("QLinear")


#: Ops that move grid values without changing them: a QuantizeLinear after one of these, reading a DequantizeLinear,
#: re-quantizes grid values (what ranges-file rebuilds write around a conv's ReLU, once for the conv's encoding and
#: once for the ReLU's). That is exact arithmetic, the same in every runtime, so it adds no rounding noise to a
#: region and keeps it one op; a wrong grid there still shows in the region's codes.
_PASS_THROUGH = ("Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze")


def _requantizes(nodes: Sequence[onnx.NodeProto], node: onnx.NodeProto, producer: dict[str, int]) -> bool:
    """Whether QuantizeLinear ``node`` reads a DequantizeLinear's values through pass-through ops only
    (``producer``: the index of the node writing each tensor)."""
    source = nodes[producer[node.input[0]]] if node.input[0] in producer else None
    while source is not None and source.op_type in _PASS_THROUGH:
        source = nodes[producer[source.input[0]]] if source.input[0] in producer else None
    return source is not None and source.op_type == "DequantizeLinear"


def _quantizing_ops(nodes: Sequence[onnx.NodeProto], producer: dict[str, int], region: set[int],
                    starts: set[str]) -> int:
    """How many nodes of ``region`` quantize a tensor that derives from ``starts`` (its cuts and graph inputs):
    a weight's own quantizer, fed by initializers only, does not count, nor a re-quantization of grid values
    (``_requantizes``)."""
    derived = set(starts)
    count = 0
    for i in sorted(region):  # graph order is topological
        if any(name in derived for name in nodes[i].input):
            derived.update(nodes[i].output)
            node = nodes[i]
            count += _quantizes(node) and not (node.op_type == "QuantizeLinear" and _requantizes(nodes, node, producer))
    return count


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
        spanned = _quantizing_ops(nodes, producer, region, region_cuts | region_inputs)
        if spanned > 1:  # fused integer ops hide the tensors between them: not one op, drift would accumulate
            note = (f"the region of tensor {tensor!r} spans {spanned} quantizing ops (fused integer ops hide the "
                    "quantized tensors between them); it has no local check.")
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
                              *(_value_info(c, types, onnx.TensorProto.FLOAT if nodes[targets[cuts[c]]].op_type
                                            == "FakeQuantize" else onnx.TensorProto.UINT8)
                                for c in ordered_cuts)])
    local.graph.output.extend(_value_info(name, {name: types[orig]} if orig in types else {}, onnx.TensorProto.FLOAT)
                              for orig, name in ((nodes[targets[t]].output[0], o) for t, o in outputs.items()))
    return local, outputs, reads, ordered_cuts


def _compare(got: np.ndarray, sim: _Simulated, ties_to_even: bool = True) -> tuple[float, float, int] | None:
    """Fraction exact, fraction one step off, max steps of ``got`` (dequantized floats, or the codes themselves when
    integer) against the simulation's codes; None when the shapes differ. Against a runtime that does not round
    ties to even, a one-step difference where the simulation sat on a tie counts as exact."""
    if got.shape != sim.value.shape:
        return None
    if not got.size:
        return 1.0, 0.0, 0
    codes = got.astype(np.int64) if np.issubdtype(got.dtype, np.integer) else sim.codes(got)  # codes as written
    steps = np.abs(codes - sim.codes(sim.value))
    if not ties_to_even and sim.ties.shape == steps.shape:  # the runtime's own rounding of exact ties
        steps[sim.ties & (steps == 1)] = 0
    return float(np.mean(steps == 0)), float(np.mean(steps == 1)), int(steps.max())


def check_layers(report: LayerReport, artifact: str, runtime: Runtime, model: onnx.ModelProto,
                 given: dict[str, np.ndarray], simulated: dict[str, _Simulated],
                 output_tensors: list[str | None]) -> None:
    """Both comparisons of one runnable in one runtime, appended to ``report``; ``simulated`` from ``recorder``,
    ``output_tensors`` the tensor name of each model output that a quantizer produced (else None)."""
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
        part = _compare(local_values[name], sim, runtime.ties_to_even) if name in local_values else None
        report.checks.append(TensorCheck(
            artifact, runtime.name, position, tensor, _op_of(model, nodes[index]), *whole,
            *(part if part is not None else (None, None, None)), reads=reads.get(tensor, []),
            elements=int(sim.value.size),
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

    ``mq.verify`` includes this report (``VerificationReport.layers``) and judges by it; call this alone for the
    layer-wise comparison without the end-to-end one. ``LayerReport.passed`` says whether every local check
    passed.
    """
    model = qmodel if qmodel is not None else result.qmodel
    if model is None:
        raise VerificationError("verify_layers needs the prepared model to compare with: pass qmodel=...")
    target = prepare_info(model).target
    tensors = as_inputs(inputs, model)
    report = LayerReport(result.backend, result.exporter)
    chosen = select_runtimes(target, runtimes, report.skipped)
    runnables = get_exporter(result.exporter).runnables(result)
    for runtime in chosen:
        if runtime.available() and any(runtime.can_run(r.model) for r in runnables):
            isolation.start(runtime)
    simulated, record = recorder(model)
    try:
        _, producers = run_observed(model, tensors, record)
    except MQError:
        raise
    except Exception as exc:
        raise ConfigError(f"the prepared model cannot run on the verification inputs: {type(exc).__name__}: "
                          f"{str(exc)[:300]}. Pass inputs of the shape and dtype the model was prepared with (any "
                          "batch size).") from exc
    output_tensors = [None if fq is None else fq.tensor for fq in producers]
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
                check_layers(report, runnable.artifact, runtime, runnable.model, given, simulated, output_tensors)
    if not ran:
        raise VerificationError(f"no runtime could run the {result.exporter} export in {result.out_dir} layer by "
                                f"layer: {'; '.join(report.skipped or ['it has no runnable artifact'])}")
    log.debug("layer-wise verification: %d tensor checks, %d failures", len(report.checks), len(report.failures))
    return report
