"""The conformance kit: does a backend's whole deploy path work on a model, and agree with the simulation?

For one backend and one model it runs prepare -> calibrate -> export with each of the backend's exporters ->
verify every artifact with every available runtime the backend declares, and reports agreement in quantization
steps. Third-party plugin authors run the same checks on their backend (see ``mq_core.testing.pytest_plugin``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.calibration import calibrate
from mq_core.export import export_many
from mq_core.plugins.lookup import get_backend
from mq_core.prepare import prepare
from mq_core.testing.zoo import ZOO
from mq_core.verify import VerificationReport, verify


@dataclass
class ConformanceResult:
    """Reports per exporter for one (backend, model)."""

    backend: str
    model: str
    reports: dict[str, VerificationReport] = field(default_factory=dict)
    #: per quantized activation tensor, fraction bit-exact between ONNX Runtime and the simulation
    tensor_agreement: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.reports) and all(r.passed for r in self.reports.values())

    def summary(self) -> str:
        lines = [f"{self.backend} x {self.model}: {'PASS' if self.passed else 'FAIL'}"]
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
) -> ConformanceResult:
    """Prepare, calibrate, export with every exporter of ``backend`` and verify each artifact.

    ``runtimes`` defaults to the backend's own list (each one that is installed and can run the artifact).
    """
    resolved = get_backend(backend)
    qmodel = prepare(model, resolved, example_inputs, qconfig=qconfig)
    calibrate(qmodel, calibration_data, progress=False)
    results = export_many(qmodel, example_inputs, out_dir, exporters)
    checked = ConformanceResult(resolved.name, model_name)
    inputs = test_inputs if test_inputs is not None else example_inputs
    for name, result in results.items():
        checked.reports[name] = verify(result, inputs, runtimes=runtimes, tolerance=tolerance)
    canonical = next(iter(results.values())).qdq_model
    checked.tensor_agreement = quantized_tensor_agreement(qmodel, canonical, inputs)
    return checked


def run_zoo_conformance(backend: str | Backend, model_name: str, out_dir: str | os.PathLike[str],
                        **kwargs: Any) -> ConformanceResult:
    """``run_conformance`` on a model of ``mq_core.testing.zoo`` with its inputs and calibration data."""
    entry = ZOO[model_name]
    return run_conformance(
        backend, entry.build(), (entry.inputs(2),), entry.calibration_data(), Path(out_dir),
        test_inputs=(entry.inputs(3, seed=7),), model_name=model_name, **kwargs,
    )


def quantized_tensor_agreement(
    qmodel: nn.Module, qdq_model: Any, inputs: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """Per quantized activation tensor, the fraction of elements where ONNX Runtime (optimisations off) running
    the canonical QDQ ONNX gives exactly the simulation's value.

    Stronger than comparing outputs: it checks every Q/DQ in the graph, including those of targets whose outputs
    stay float (TensorRT, OpenVINO).
    """
    import numpy as np
    import onnx

    from mq_core.calibration import quantizers
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
    probes = {tensor: f"{tensor}_dequantized" for tensor in captured}
    known = {o for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    for tensor, name in list(probes.items()):
        if name not in known:  # a quantized graph output keeps the output's name
            dq = next(n for n in model.graph.node if n.name == f"{tensor}_DequantizeLinear")
            probes[tensor] = dq.output[0]
        if probes[tensor] not in graph_outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(probes[tensor], onnx.TensorProto.FLOAT, None))
    feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, inputs)}
    names = [o.name for o in model.graph.output]
    values = dict(zip(names, OnnxRuntime().run(model, feeds)))
    return {tensor: float(np.mean(values[probes[tensor]] == captured[tensor])) for tensor in captured}
