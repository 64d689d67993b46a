"""verify_layers() and verify's verdict: every quantized tensor against the simulation, through the network and one
op at a time.

On a ResNet-18-shaped model end-to-end agreement drifts with depth on a correct export (summation order), so the
outputs alone cannot tell a right export from a wrong one; the local checks can, and they name the op at fault.
``verify`` judges by them: drift passes when every local check holds and it stays within the bounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.export.onnx_graph import Graph
from mq_core.pipeline import verify as verify_module
from mq_core.pipeline.verify import OutputCheck
from mq_core.testing import mutations
from mq_core.testing.zoo import ZOO, resnet18

MUTATED = "layers_3_conv1"  # block 4 of 8: its first conv (with its ReLU), mid-network


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[mq.ExportResult, torch.Tensor]:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qmodel = mq.prepare(resnet18(), "qdq", x)
    gen = torch.Generator().manual_seed(1)
    mq.calibrate(qmodel, [torch.randn(4, 3, 64, 64, generator=gen) for _ in range(2)], progress=False)
    return mq.export(qmodel, x, tmp_path_factory.mktemp("resnet18")), x


def test_every_local_check_holds_on_a_correct_export(exported: tuple[mq.ExportResult, torch.Tensor]) -> None:
    result, x = exported
    report = mq.verify_layers(result, x, runtimes=["onnxruntime"])
    activations = [fq.tensor for fq in mq.quantizers(result.qmodel, weights=False).values()]
    assert report.checks[0].tensor == "x" and report.checks[-1].tensor == "fc"
    assert sorted(c.tensor for c in report.checks) == sorted(activations)
    assert [c.position for c in report.checks] == list(range(len(activations)))
    for check in report.checks:
        assert check.local_max_steps is not None and check.local_max_steps <= 1, check
        assert check.local_exact >= 0.99, check
    assert report.passed and report.first_broken() == {} and not report.failures
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] and data["first_broken"] == [] and len(data["checks"]) == len(activations)
    assert "onnx-qdq in onnxruntime: all 31 local checks pass (<= 1 step, >= 99% exact)" in report.table()


def _mutated(result: mq.ExportResult, folder: Path) -> mq.ExportResult:
    """The export with one activation scale initializer x1.25 inside the ONNX (read by the tensor's Q and DQ), the
    manifest untouched."""
    model = onnx.load(result.path("onnx-qdq"))
    graph = Graph(model)
    pair = next(p for p in graph.qdq_pairs() if p.quantize is not None and p.input == MUTATED)
    assert pair.quantize.input[1] == pair.dequantize.input[1]
    graph.set_initializer(pair.quantize.input[1], graph.array(pair.quantize.input[1]) * np.float32(1.25))
    onnx.save(model, folder / "model.onnx")
    return mq.ExportResult(folder, result.backend, result.exporter, [mq.Artifact("onnx-qdq", folder / "model.onnx")],
                           result.manifest, result.qmodel)


def test_a_scaled_activation_scale_is_localised(exported: tuple[mq.ExportResult, torch.Tensor],
                                                tmp_path: Path) -> None:
    result, x = exported
    report = mq.verify_layers(_mutated(result, tmp_path), x, runtimes=["onnxruntime"])
    assert not report.passed
    broken = report.first_broken()[("onnx-qdq", "onnxruntime")]
    # the tensor itself (its codes saturate elsewhere) or the op right after it, whose region reads its DQ
    assert broken.tensor == MUTATED or MUTATED in broken.reads, broken
    failing = [c for c in report.checks if c.local_passed is False]
    assert all(c.tensor == MUTATED or MUTATED in c.reads for c in failing), failing
    assert all(c.local_passed for c in report.checks if c.position < broken.position)
    assert f"first op that breaks locally: {broken.op} -> tensor {broken.tensor!r}" in report.table()
    assert report.to_dict()["first_broken"][0]["tensor"] == broken.tensor


@pytest.mark.parametrize("backend, exporter, qconfig", [("tensorrt", "tensorrt-legacy", None),
                                                         ("openvino", "openvino", None), ("qdq", "qdq", "w4a4")])
def test_rebuilt_fakequantize_and_clipped_artifacts_are_compared_tensor_by_tensor(
    backend: str, exporter: str, qconfig: str | None, tmp_path: Path
) -> None:
    """Ranges-file artifacts (Q/DQ rebuilt from the file, the graph output renamed), OpenVINO's FakeQuantize form
    and 4-bit grids (an integer Clip between Q and DQ, inside each region) locate every quantized tensor too."""
    entry = ZOO["resnet"]
    x = entry.inputs(2)
    qmodel = mq.prepare(entry.build(), backend, x, **({"qconfig": qconfig} if qconfig else {}))
    mq.calibrate(qmodel, entry.calibration_data(batches=2), progress=False)
    result = mq.export(qmodel, x, tmp_path, exporter)
    runtime = "openvino" if exporter == "openvino" else "onnxruntime"
    if not mq.get_runtime(runtime).available():
        pytest.skip(f"{runtime} is not installed")
    report = mq.verify_layers(result, entry.inputs(3, seed=4), runtimes=[runtime])
    tensors = {fq.tensor for fq in mq.quantizers(qmodel, weights=False).values()}
    assert report.passed and not report.notes
    assert {c.tensor for c in report.checks if c.artifact == report.checks[0].artifact} == tensors


def test_cli_verify_layers(exported: tuple[mq.ExportResult, torch.Tensor], tmp_path: Path) -> None:
    result, x = exported
    checkpoint = mq.save_checkpoint(result.qmodel, tmp_path / "qmodel.pt", x,
                                    model_ref="mq_core.testing.zoo:resnet18")
    torch.save(x, tmp_path / "x.pt")
    args = ["verify", str(result.out_dir), "--checkpoint", str(checkpoint), "--trust-model-ref", "--runtime",
            "onnxruntime", "--inputs", str(tmp_path / "x.pt")]
    runner = CliRunner()
    as_json = runner.invoke(cli, [*args, "--json"])
    data = json.loads(as_json.output)
    assert as_json.exit_code == 0 and data["passed"], as_json.output
    assert data["layers"]["passed"] and len(data["layers"]["checks"]) == len(mq.quantizers(result.qmodel,
                                                                                            weights=False))
    text = runner.invoke(cli, args)
    assert "onnx-qdq in onnxruntime: all 31 local checks pass" in text.output and "Layer-wise" not in text.output
    table = runner.invoke(cli, [*args, "--all-layers"])
    assert "Layer-wise" in table.output and "layers_3_conv1" in table.output
    without = runner.invoke(cli, [*args, "--no-layers", "--json"])
    assert json.loads(without.output)["layers"] is None
    wrong = mutations.copy_export(result, tmp_path / "wrong")
    mutations.scale_activation(wrong, MUTATED)
    broken = runner.invoke(cli, ["verify", str(wrong.out_dir), *args[2:]])
    assert broken.exit_code == 1 and "FAIL: worst" in broken.output, broken.output
    assert "first op that breaks locally:" in broken.output.splitlines()[-1]


def test_needs_the_prepared_model(exported: tuple[mq.ExportResult, torch.Tensor]) -> None:
    result, x = exported
    with pytest.raises(mq.VerificationError, match="pass qmodel="):
        mq.verify_layers(mq.ExportResult.load(result.out_dir), x)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Eight images: enough rows for the top-1 bound, and the correct export drifts beyond one step on them."""
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_verify_passes_a_correct_export_that_drifts(exported: tuple[mq.ExportResult, torch.Tensor],
                                                    batch: torch.Tensor) -> None:
    result, _ = exported
    report = mq.verify(result, batch, runtimes=["onnxruntime"])
    (check,) = report.checks
    # the old rule (max steps within the tolerance) fails this correct export; the local checks tell it is drift
    assert not check.within_tolerance and check.max_steps > 1, check
    assert check.passed and check.verdict == "drift: every local check passes", check
    assert check.sqnr_db >= check.quant_sqnr_db - verify_module.DRIFT_MARGIN_DB
    assert check.top1 is not None and check.quant_top1 is not None
    assert report.passed and report.layers is not None and report.first_broken() == {}
    data = report.to_dict()
    assert data["passed"] and data["layers"]["passed"] and data["checks"][0]["verdict"] == check.verdict
    assert "all 31 local checks pass" in report.table() and "drift: every local check passes" in report.table()
    # without the layer-wise check, drift cannot be told from error: the old verdict
    old = mq.verify(result, batch, runtimes=["onnxruntime"], layers=False)
    assert old.layers is None and not old.passed and "did not run" in old.checks[0].verdict


def test_verify_fails_a_wrong_scale_whatever_the_outputs_say(exported: tuple[mq.ExportResult, torch.Tensor],
                                                             batch: torch.Tensor, tmp_path: Path) -> None:
    result, _ = exported
    report = mq.verify(_mutated(result, tmp_path), batch, runtimes=["onnxruntime"])
    assert not report.passed
    broken = report.first_broken()[("onnx-qdq", "onnxruntime")]
    assert broken.tensor == MUTATED or MUTATED in broken.reads, broken
    assert "an op breaks locally" in report.checks[0].verdict
    assert f"first op that breaks locally: {broken.op} -> tensor {broken.tensor!r}" in report.table()


def _drifted(sqnr: float, quant_sqnr: float, top1: float | None, quant_top1: float | None) -> OutputCheck:
    return OutputCheck("onnx-qdq", "onnxruntime", "y", 1.0, 0.1, 10.0, 0.5, sqnr, top1, False, quant_sqnr, quant_top1)


@pytest.mark.parametrize("sqnr, top1, reason", [
    (18.0, 0.875, ""),  # 3 dB below quantization's own 21 dB, one row of 8 below float's top-1: noise
    (17.9, 0.875, "SQNR against the simulation 17.9 dB < 18.0 dB"),
    (25.0, 0.75, "top-1 agreement 75.0% < float's 100.0% less one row"),
    (25.0, None, ""),
])
def test_drift_bounds_are_relative_to_what_quantization_costs(sqnr: float, top1: float | None, reason: str) -> None:
    check = _drifted(sqnr, 21.0, top1, None if top1 is None else 1.0)
    beyond = verify_module._beyond(check, rows=8)
    assert (reason in beyond) if reason else beyond == "", beyond
