"""Real architectures through every backend (issue 12, item 5): ResNet-18- and MobileNetV2-shaped models, W8A8, every
exporter of every installed backend, verified in every runtime the backend declares.

Deep networks drift end to end between torch and a runtime (summation order), so these are the exports the
verdict must tell from wrong ones: each correct export PASSes (every local check passes and the drift stays within
the documented bounds), and each mutation of ``mq_core.testing.mutations`` that a target's artifacts can hold (an
activation scale x1.25, a zero point off by one in the DequantizeLinear, a dropped Q/DQ pair) FAILs, with the
report naming the mutated tensor, or for a dropped pair the first op that read it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import mq_core as mq
from mq_core.testing import mutations
from mq_core.testing.conformance import ConformanceResult, run_conformance
from mq_core.testing.zoo import mobilenet_v2, resnet18

BACKENDS = sorted(mq.list_backends())
MODELS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
SIZE = 64  # the last stage of both is 2x2, as at 224x224 it is 7x7
#: Bound on the simulation's distance from the float model (the kit's ``max_float_error``). Randomly initialised,
#: these deep networks amplify any perturbation layer by layer: W8A8 measured 0.09-0.14 (17-21 dB) on
#: ResNet-18 and 0.34-0.40 (8-9.5 dB; weights alone 12.7 dB) on MobileNetV2, on every target.
MAX_FLOAT_ERROR = {"resnet18": 0.25, "mobilenet_v2": 0.5}


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], ConformanceResult]:
    """``conformance(model, backend)``: the conformance kit run once per module (prepared on two images,
    calibrated on two batches of four, verified on eight so that top-1 agreement is judged)."""
    done: dict[tuple[str, str], ConformanceResult] = {}

    def get(model: str, backend: str) -> ConformanceResult:
        if (model, backend) not in done:
            gen = torch.Generator().manual_seed(1)
            calibration = [torch.randn(4, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
            done[model, backend] = run_conformance(
                backend, MODELS[model](size=SIZE), (calibration[0][:2],), calibration,
                tmp_path_factory.mktemp(f"{model}-{backend}"),
                test_inputs=(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)),),
                model_name=model, max_float_error=MAX_FLOAT_ERROR[model])
        return done[model, backend]

    return get


def test_every_target_is_installed() -> None:
    assert {"qdq", "tensorrt", "snpe", "tvm", "openvino", "tengine"} <= set(BACKENDS)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_correct_exports_pass_on_every_target(conformance: Callable[[str, str], ConformanceResult], backend: str,
                                              model: str) -> None:
    result = conformance(model, backend)
    assert result.passed, result.summary()
    declared = mq.get_backend(backend).runtimes
    assert set(result.reports) == set(mq.get_backend(backend).exporters)
    ran: set[str] = set()
    for exporter, report in result.reports.items():
        assert not [s for s in report.skipped if "not installed" in s], report.skipped
        runtimes = {c.runtime for c in report.checks}
        assert runtimes and runtimes <= set(declared), f"{exporter} ran in {runtimes}"
        assert report.layers is not None and report.layers.checks and report.layers.passed, report.table(True)
        ran |= runtimes
    assert ran == set(declared)  # every runtime the backend declares ran one of its artifacts


#: (backend, exporter, runtimes) of the artifacts the mutations are planted in: every form the toolkit edits (Q/DQ
#: ONNX, FakeQuantize ONNX, each ranges-file format). The TVM artifact is checked in ONNX Runtime: TVM compiles
#: three models per verification, and its runtime runs the correct exports above.
RUNS = [
    ("tensorrt", "tensorrt", ["onnxruntime"]),
    ("tensorrt", "tensorrt-legacy", ["onnxruntime"]),
    ("snpe", "snpe", ["onnxruntime"]),
    ("tengine", "tengine", ["onnxruntime"]),
    ("openvino", "openvino", ["openvino"]),
    ("openvino", "openvino-qdq", ["onnxruntime"]),
    ("tvm", "tvm", ["onnxruntime"]),
]
RANGES_FILES = ("tensorrt-legacy", "snpe", "tengine")
MUTATED = "layers_3_conv1"  # block 4 of 8: its first conv's (ReLU) output, a quantized tensor on every target
MUTATIONS = {"scale x1.25": mutations.scale_activation, "zero point +1": mutations.shift_zero_point,
             "dropped pair": mutations.drop_qdq}


def _expected(baseline: mq.VerificationReport, artifact: str, runtime: str, tensor: str, mutation: str) -> str:
    """What the report must name: the mutated tensor when the correct export has a local check of it; for a
    dropped pair, or a tensor without a local check of its own (its region spans a second quantizer, e.g. the
    conv output a ranges file quantizes with its ReLU's encoding), the first checked tensor (graph order) whose op
    read it in the correct export."""
    checks = [c for c in baseline.layers.checks
              if (c.artifact, c.runtime) == (artifact, runtime) and c.local_passed is not None]
    if mutation != "dropped pair" and tensor in {c.tensor for c in checks}:
        return tensor
    return next(c.tensor for c in checks if tensor in c.reads)


def _mutated_report(result: ConformanceResult, exporter: str, runtimes: list[str], mutation: str,
                    out: Path) -> tuple[str, mq.VerificationReport]:
    """The mutated tensor and the verification of a mutated copy of ``exporter``'s export, on the kit's inputs."""
    export = result.exports[exporter]
    copy = mutations.copy_export(export, out)
    tensor = MUTATIONS[mutation](copy.out_dir, MUTATED)
    inputs = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    return tensor, mq.verify(mq.ExportResult.load(copy.out_dir), inputs, runtimes=runtimes, qmodel=export.qmodel)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("backend, exporter, runtimes", RUNS, ids=[f"{b}/{e}" for b, e, _ in RUNS])
def test_mutations_fail_on_every_target(conformance: Callable[[str, str], ConformanceResult], tmp_path: Path,
                                        backend: str, exporter: str, runtimes: list[str], mutation: str) -> None:
    result = conformance("resnet18", backend)
    if mutation == "zero point +1" and exporter in RANGES_FILES:
        # one zero point serves Q and DQ in a ranges file: they cannot disagree, so the mutation does not apply
        with pytest.raises(mq.ConfigError, match="no artifact"):
            _mutated_report(result, exporter, runtimes, mutation, tmp_path / "export")
        return
    tensor, report = _mutated_report(result, exporter, runtimes, mutation, tmp_path / "export")
    baseline = result.reports[exporter]  # the correct export, verified by the kit on the same inputs
    assert baseline.passed and not report.passed
    runs = {(c.artifact, c.runtime) for c in baseline.checks if c.runtime in runtimes}
    broken = report.first_broken()
    assert set(broken) == runs, report.table(True)  # every artifact (each ranges file) in every runtime
    for (artifact, runtime), check in broken.items():
        assert check.tensor == _expected(baseline, artifact, runtime, tensor, mutation), report.table(True)
