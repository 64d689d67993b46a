"""verify_layers(): every quantized tensor against the simulation, through the network and one op at a time.

On a ResNet-18-shaped model end-to-end agreement drifts with depth on a correct export (summation order), so the
outputs alone cannot tell a right export from a wrong one; the local checks can, and they name the op at fault.
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
    assert "every local check within 1 step" in report.table()


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
            "onnxruntime", "--inputs", str(tmp_path / "x.pt"), "--layers"]
    runner = CliRunner()
    as_json = runner.invoke(cli, [*args, "--json"])
    data = json.loads(as_json.output)
    assert as_json.exit_code == (0 if data["passed"] else 1)  # the verdict stays the outputs'
    assert data["layers"]["passed"] and len(data["layers"]["checks"]) == len(mq.quantizers(result.qmodel,
                                                                                            weights=False))
    text = runner.invoke(cli, args)
    assert "Layer-wise" in text.output and "onnx-qdq in onnxruntime: every local check within 1 step" in text.output
    without = runner.invoke(cli, [*args[:-1], "--json"])
    assert "layers" not in json.loads(without.output)


def test_needs_the_prepared_model(exported: tuple[mq.ExportResult, torch.Tensor]) -> None:
    result, x = exported
    with pytest.raises(mq.VerificationError, match="pass qmodel="):
        mq.verify_layers(mq.ExportResult.load(result.out_dir), x)
