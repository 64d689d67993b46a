"""The conformance kit: does a backend's whole deploy path work on a model, and agree with the simulation?

For one backend and one model it runs prepare -> calibrate -> export with each of the backend's exporters ->
verify every artifact with every available runtime the backend declares, and reports agreement in quantization
steps. Third-party plugin authors run the same checks on their backend (see ``mq_core.testing.pytest_plugin``).

Agreement alone would pass a backend whose simulation is useless (an observer that saturates every activation
gives outputs the runtimes reproduce exactly), so the kit also checks that the simulation stays close to the
float model (``max_float_error``) and that every quantizer's qparams lie on the backend's grids.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.export import ExportResult
from mq_core.export.deploy import deploy_view
from mq_core.pipeline.calibrate import calibrate
from mq_core.pipeline.export import export_many
from mq_core.pipeline.prepare import prepare
from mq_core.pipeline.resolve import resolve_qconfig
from mq_core.pipeline.verify import VerificationReport, simulate, verify
from mq_core.plugins.lookup import get_backend
from mq_core.quant.qconfig import QConfig
from mq_core.quant.scheme import QuantScheme
from mq_core.quant.switches import quantizers
from mq_core.testing.zoo import ZOO

#: Default bound on ``||simulated - float|| / ||float||`` per output. 8-bit grids stay under 0.02 on the zoo and
#: power-of-two scales under 0.11; a simulation that saturates its activations is near 1. Grids under 8 bits
#: need a larger bound (pass ``max_float_error``).
MAX_FLOAT_ERROR = 0.25
#: At most this many grid problems are listed one by one.
MAX_LISTED = 10


@dataclass
class ConformanceResult:
    """Reports per exporter for one (backend, model)."""

    backend: str
    model: str
    reports: dict[str, VerificationReport] = field(default_factory=dict)
    #: per quantized activation tensor, fraction bit-exact between ONNX Runtime and the simulation
    tensor_agreement: dict[str, float] = field(default_factory=dict)
    #: per network output, ``||simulated - float|| / ||float||`` on the test inputs
    float_error: dict[str, float] = field(default_factory=dict)
    #: what failed besides the verification reports: outputs too far from float, qparams off the backend's grids
    problems: list[str] = field(default_factory=list)
    #: the exports verified, by exporter (with the prepared model: to verify again, e.g. after a ``mutations`` edit)
    exports: dict[str, ExportResult] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.reports) and all(r.passed for r in self.reports.values()) and not self.problems

    def summary(self) -> str:
        lines = [f"{self.backend} x {self.model}: {'PASS' if self.passed else 'FAIL'}"]
        lines += [f"problem: {p}" for p in self.problems]
        for exporter, report in self.reports.items():
            lines.append(f"-- exporter {exporter}")
            lines.append(report.table())
        return "\n".join(lines)


def run_conformance(
    backend: str | Backend,
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    calibration_data: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    test_inputs: tuple[torch.Tensor, ...] | None = None,
    exporters: list[str] | None = None,
    runtimes: Sequence[str] | None = None,
    tolerance: float | None = None,
    qconfig: Any = None,
    model_name: str = "model",
    max_float_error: float = MAX_FLOAT_ERROR,
) -> ConformanceResult:
    """Prepare, calibrate, export with every exporter of ``backend`` and verify each artifact; check the
    simulation against the float model (``max_float_error``, see ``MAX_FLOAT_ERROR``) and every quantizer's
    qparams against the backend's grids.

    ``runtimes`` defaults to the backend's own list (each one that is installed and can run the artifact).
    """
    resolved = get_backend(backend)
    inputs = test_inputs if test_inputs is not None else example_inputs
    reference = simulate(copy.deepcopy(model), inputs)[0]
    qmodel = prepare(model, resolved, example_inputs, qconfig=qconfig)
    calibrate(qmodel, calibration_data, progress=False)
    checked = ConformanceResult(resolved.name, model_name)
    checked.problems += grid_problems(qmodel, resolve_qconfig(resolved, qconfig))
    checked.float_error = float_error(simulate(qmodel, inputs)[0], reference)
    checked.problems += [
        f"output {name} of the simulation is {error:.3g} away from the float model's (relative L2 error; the bound "
        f"is {max_float_error:g}): the calibrated ranges do not fit the data (an observer that clips or saturates?)"
        for name, error in checked.float_error.items() if not error <= max_float_error
    ]
    results = checked.exports = export_many(qmodel, example_inputs, out_dir, exporters)
    for name, result in results.items():
        checked.reports[name] = verify(result, inputs, runtimes=runtimes, tolerance=tolerance)
    canonical = next(iter(results.values())).qdq_model
    checked.tensor_agreement = quantized_tensor_agreement(qmodel, canonical, inputs)
    return checked


def float_error(simulated: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """Per output (named as the exported graph names them), ``||simulated - float|| / ||float||``."""
    names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    errors = {}
    for name, sim, ref in zip(names, simulated, reference):
        ref64, sim64 = ref.astype(np.float64), sim.astype(np.float64)
        errors[name] = float(np.linalg.norm(sim64 - ref64) / max(np.linalg.norm(ref64), 1e-12))
    return errors


def _grid_of(fq: Any, qconfig: QConfig) -> QuantScheme:
    """The backend's grid for this quantizer: its weight grid, or its activation grid (made unsigned where the
    placement found a non-negative tensor, as ``mq_core.graph.placement.materialize`` does); channel axis as used."""
    expected = (qconfig.weight if fq.role == "weight" else qconfig.activation).scheme
    if fq.role != "weight" and expected.signed and not fq.scheme.signed:
        expected = expected.replace(signed=False, narrow_range=False)
    return expected.replace(ch_axis=fq.scheme.ch_axis)


def _off_grid(fq: Any, scale: torch.Tensor, zero_point: torch.Tensor) -> list[str]:
    scheme = fq.scheme
    found = []
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        found.append("a scale that is not a positive finite number")
    elif scheme.pot_scale and not (torch.frexp(scale).mantissa == 0.5).all():
        found.append("a scale that is not a power of two")
    if not (scale.dim() == 1 if scheme.per_channel else scale.numel() == 1):
        found.append(f"{scale.numel()} scale value(s) on a {'per-channel' if scheme.per_channel else 'per-tensor'} "
                     "grid")
    if zero_point.is_floating_point() and not torch.equal(zero_point, zero_point.round()):
        found.append("a zero point that is not an integer")
    if not ((zero_point >= scheme.qmin) & (zero_point <= scheme.qmax)).all():
        found.append(f"a zero point outside the grid [{scheme.qmin}, {scheme.qmax}]")
    elif scheme.symmetric and (zero_point != 0).any():
        found.append("a zero point other than 0 on a symmetric grid")
    return found


def grid_problems(qmodel: nn.Module, qconfig: QConfig) -> list[str]:
    """Each quantizing fake quantizer of a calibrated ``qmodel`` whose grid is not the backend's (``qconfig``
    resolved by the backend) or whose deploy qparams do not lie on it, as one sentence."""
    found = []
    for name, fq in quantizers(qmodel).items():
        if not fq.quant_enabled.item():
            continue
        expected = _grid_of(fq, qconfig)
        if fq.scheme != expected:
            found.append(f"quantizer {name} uses the grid {fq.scheme.describe()}; the backend's {fq.role} grid is "
                         f"{expected.describe()}.")
        scale, zero_point = fq.export_qparams()
        issues = _off_grid(fq, scale.detach(), zero_point.detach())
        if issues:
            found.append(f"quantizer {name} has {' and '.join(issues)} ({fq.scheme.describe()}).")
    if len(found) > MAX_LISTED:
        found[MAX_LISTED:] = [f"... and {len(found) - MAX_LISTED} more quantizers off the backend's grids."]
    return found


def run_zoo_conformance(backend: str | Backend, model_name: str, out_dir: str | os.PathLike[str],
                        **kwargs: Any) -> ConformanceResult:
    """``run_conformance`` on a model of ``mq_core.testing.zoo`` with its inputs and calibration data."""
    entry = ZOO[model_name]
    return run_conformance(
        backend, entry.build(), (entry.inputs(2),), entry.calibration_data(), Path(out_dir),
        test_inputs=(entry.inputs(3, seed=7),), model_name=model_name, **kwargs,
    )


def export_zoo_model(backend: str | Backend, model_name: str, out_dir: str | os.PathLike[str],
                     exporters: list[str] | None = None) -> tuple[dict[str, ExportResult], torch.Tensor]:
    """A model of ``mq_core.testing.zoo`` prepared for ``backend``, calibrated on two batches of four and exported
    with each of ``exporters`` (default: all of the backend's) into ``out_dir/<exporter>/``.

    What a backend's format tests read: the artifacts of a realistic network, made without the verification and
    grid checks of ``run_conformance`` so that the tests can look inside the files. Returns the results by exporter
    and the input the model was traced with.
    """
    entry = ZOO[model_name]
    inputs = entry.inputs()
    qmodel = prepare(entry.build(), get_backend(backend), inputs)
    calibrate(qmodel, entry.calibration_data(batches=2, batch=4), progress=False)
    return export_many(qmodel, inputs, Path(out_dir), exporters), inputs


def quantized_tensor_agreement(
    qmodel: nn.Module, qdq_model: Any, inputs: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """Per quantized activation tensor, the fraction of elements where ONNX Runtime (optimisations off) running
    the canonical QDQ ONNX gives exactly the simulation's value.

    Stronger than comparing outputs: it checks every Q/DQ in the graph, including those of targets whose outputs
    stay float (TensorRT, OpenVINO).
    """
    import onnx

    from mq_core.runtimes.onnxruntime import OnnxRuntime

    captured: dict[str, np.ndarray] = {}
    hooks = [fq.register_forward_hook(lambda m, _i, out: captured.__setitem__(m.tensor, out.detach().numpy()))
             for fq in quantizers(qmodel, weights=False).values()]
    try:
        qmodel.eval()
        with torch.no_grad():
            qmodel(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    model = onnx.ModelProto.FromString(qdq_model.SerializeToString())
    shared = deploy_view(qmodel).mq_shared_tensors  # computed once: probed through the tensor that stands for it
    probes = {tensor: f"{shared.get(tensor, tensor)}_dequantized" for tensor in captured}
    known = {o for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    for tensor, name in list(probes.items()):
        if name not in known:  # a quantized graph output keeps the output's name
            dq = next(n for n in model.graph.node if n.name == f"{shared.get(tensor, tensor)}_DequantizeLinear")
            probes[tensor] = dq.output[0]
        if probes[tensor] not in graph_outputs:
            graph_outputs.add(probes[tensor])
            model.graph.output.append(onnx.helper.make_tensor_value_info(probes[tensor], onnx.TensorProto.FLOAT, None))
    feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, inputs)}
    names = [o.name for o in model.graph.output]
    values = dict(zip(names, OnnxRuntime().run(model, feeds)))
    return {tensor: float(np.mean(values[probes[tensor]] == captured[tensor])) for tensor in captured}
