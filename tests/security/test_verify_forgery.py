"""`mq verify` cannot be talked into PASS by the export it checks: steps come from the prepared model, and a manifest
that disagrees with the checkpoint fails on its own."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.export.onnx_graph import Graph
from mq_core.testing.mutations import update_checksums
from mq_core.testing.zoo import ZOO

OUTPUT_TENSOR = "net_6"  # the quantized tensor the MLP's logits are dequantized from


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path, Path]:
    """A prepared MLP, verification inputs, its checkpoint and its qdq export folder."""
    entry = ZOO["mlp_bn"]
    x = entry.inputs(4)
    qmodel = mq.prepare(entry.build(), "qdq", x)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    root = tmp_path_factory.mktemp("forgery")
    checkpoint = mq.save_checkpoint(qmodel, root / "qmodel.pt", x, model_ref="mq_core.testing.zoo:MLPBN")
    mq.export(qmodel, x, root / "export")
    return qmodel, x, checkpoint, root / "export"


def forged(original_dir: Path, target: Path, edit_manifest: Callable[[dict[str, Any]], None],
           edit_model: Callable[[Graph], None] | None = None) -> Path:
    """A copy of the export folder edited as an attacker would: the model changed, the manifest changed and its
    checksums updated to match, so that the folder loads like an untouched one."""
    shutil.copytree(original_dir, target)
    if edit_model is not None:
        model = onnx.load(target / "model.onnx")
        edit_model(Graph(model))
        onnx.save(model, target / "model.onnx")
    update_checksums(target, edit_manifest)
    return target


def inflate_output_scale(manifest: dict[str, Any]) -> None:
    manifest["quantizers"][OUTPUT_TENSOR]["scale"] = 1e6


def shift_logits(graph: Graph) -> None:
    """A wrong model: the last layer's bias moved by 0.1 (about 30 output steps)."""
    bias = "net.6.layer.bias"
    graph.set_initializer(bias, graph.array(bias) + np.float32(0.1))


def test_untouched_export_passes_with_no_failures(original: tuple[nn.Module, torch.Tensor, Path, Path]) -> None:
    qmodel, x, _, folder = original
    report = mq.verify(mq.ExportResult.load(folder), x, runtimes=["onnxruntime"], qmodel=qmodel)
    assert report.passed and report.failures == [], report.table()


def test_tampered_model_with_an_inflated_manifest_scale_fails(
        original: tuple[nn.Module, torch.Tensor, Path, Path], tmp_path: Path) -> None:
    qmodel, x, _, folder = original
    folder = forged(folder, tmp_path / "export", inflate_output_scale, shift_logits)
    report = mq.verify(mq.ExportResult.load(folder), x, runtimes=["onnxruntime"], qmodel=qmodel)
    assert not report.passed
    (check,) = report.checks  # judged with the checkpoint's step, not the manifest's 1e6
    step = float(qmodel.get_submodule(f"{OUTPUT_TENSOR}_fq").scale)
    assert check.step == pytest.approx(step) and check.max_steps > 20 and not check.passed
    assert any(OUTPUT_TENSOR in f and "1e+06 in the manifest" in f for f in report.failures), report.failures


def test_a_manifest_that_disagrees_with_the_checkpoint_fails_on_its_own(
        original: tuple[nn.Module, torch.Tensor, Path, Path], tmp_path: Path) -> None:
    qmodel, x, _, folder = original

    def edit(manifest: dict[str, Any]) -> None:
        inflate_output_scale(manifest)
        manifest["quantizers"]["net.0.weight"]["zero_point"][3] = 5

    folder = forged(folder, tmp_path / "export", edit)
    report = mq.verify(mq.ExportResult.load(folder), x, runtimes=["onnxruntime"], qmodel=qmodel)
    assert all(c.passed and c.exact == 1.0 for c in report.checks)  # the artifact itself is untouched
    assert not report.passed
    step = float(qmodel.get_submodule(f"{OUTPUT_TENSOR}_fq").scale)
    assert report.failures == [
        "the manifest disagrees with the checkpoint on tensor 'net.0.weight': zero_point[3] 5 in the manifest, 0 in "
        "the checkpoint.",
        f"the manifest disagrees with the checkpoint on tensor '{OUTPUT_TENSOR}': scale 1e+06 in the manifest, "
        f"{step:.6g} in the checkpoint.",
    ]
    assert "FAIL: the manifest disagrees" in report.table() and not report.to_dict()["passed"]


def test_a_manifest_for_another_backend_or_with_extra_tensors_fails(
        original: tuple[nn.Module, torch.Tensor, Path, Path], tmp_path: Path) -> None:
    qmodel, x, _, folder = original

    def edit(manifest: dict[str, Any]) -> None:
        manifest["backend"] = "tensorrt"
        manifest["quantizers"]["ghost"] = {**manifest["quantizers"]["x"], "tensor": "ghost"}
        del manifest["quantizers"]["net_0"]

    folder = forged(folder, tmp_path / "export", edit)
    report = mq.verify(mq.ExportResult.load(folder), x, runtimes=["onnxruntime"], qmodel=qmodel)
    assert not report.passed
    assert report.failures == [
        "the export was made for backend 'tensorrt' but the checkpoint was prepared for 'qdq'.",
        "the manifest lists quantized tensor 'ghost', which the checkpoint does not quantize.",
        "the checkpoint quantizes tensor 'net_0', which the manifest does not list.",
    ]


def test_mq_verify_judges_with_the_checkpoint(original: tuple[nn.Module, torch.Tensor, Path, Path],
                                              tmp_path: Path) -> None:
    _, _, checkpoint, folder = original
    args = ["--checkpoint", str(checkpoint), "--model", "mq_core.testing.zoo:MLPBN", "--runtime", "onnxruntime"]
    passed = CliRunner().invoke(cli, ["verify", str(folder), *args])
    assert passed.exit_code == 0 and "PASS" in passed.output, passed.output
    folder = forged(folder, tmp_path / "export", inflate_output_scale, shift_logits)
    failed = CliRunner().invoke(cli, ["verify", str(folder), *args, "--json"])
    assert failed.exit_code == 1, failed.output
    report = json.loads(failed.output)
    assert not report["passed"] and report["checks"][0]["max_steps"] > 20
    assert any("1e+06 in the manifest" in f for f in report["failures"])
