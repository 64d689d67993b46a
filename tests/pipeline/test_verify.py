"""verify(): real runtimes against the simulation, in steps; it must fail when the artifact is wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import mq_core as mq
from mq_core.export.onnx_graph import Graph
from mq_core.pipeline.verify import STEP_EPSILON, select_runtimes
from mq_core.testing.zoo import ZOO


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> mq.ExportResult:
    entry = ZOO["unet"]
    x = entry.inputs(2)
    qmodel = mq.prepare(entry.build(), "qdq", x)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    return mq.export(qmodel, x, tmp_path_factory.mktemp("unet"))


def test_report_is_exact_per_output_and_runtime(exported: mq.ExportResult) -> None:
    report = mq.verify(exported, ZOO["unet"].inputs(3, seed=4), runtimes=["onnxruntime", "tvm"])
    assert report.passed
    assert {c.runtime for c in report.checks} == {"onnxruntime", "tvm"}
    for check in report.checks:
        assert check.output == "output" and check.max_steps == 0 and check.exact == 1.0
        assert check.step == pytest.approx(exported.manifest["quantizers"]["add"]["scale"])
    data = report.to_dict()
    assert data["passed"] and len(data["checks"]) == 2
    assert "max diff (steps)" in report.table()


def test_a_wrong_scale_in_the_artifact_fails(exported: mq.ExportResult, tmp_path: Path) -> None:
    model = onnx.load(exported.path("onnx-qdq"))
    graph = Graph(model)
    pair = next(p for p in graph.qdq_pairs() if p.quantize is not None and p.input == "head")
    # The dequantize alone reads a scale 1.5x too large: every value that is not 0 comes out wrong.
    graph.set_initializer("tampered_scale", graph.array(pair.dequantize.input[1]) * 1.5)
    pair.dequantize.input[1] = "tampered_scale"
    broken = tmp_path / "model.onnx"
    onnx.save(model, broken)
    tampered = mq.ExportResult(tmp_path, exported.backend, exported.exporter,
                               [mq.Artifact("onnx-qdq", broken)], exported.manifest, exported.qmodel)
    report = mq.verify(tampered, ZOO["unet"].inputs(3, seed=4), runtimes=["onnxruntime"])
    assert not report.passed
    assert report.worst_steps > 1 + STEP_EPSILON
    assert "FAIL" in report.table()


def test_export_folder_reloads_and_detects_changes(exported: mq.ExportResult, tmp_path: Path) -> None:
    loaded = mq.ExportResult.load(exported.out_dir)
    assert loaded.manifest == exported.manifest
    assert mq.verify(loaded, ZOO["unet"].inputs(2), qmodel=exported.qmodel, runtimes=["onnxruntime"]).passed
    with pytest.raises(mq.VerificationError, match="prepared model"):
        mq.verify(loaded, ZOO["unet"].inputs(2))
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in exported.out_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(mq.ConfigError, match="modified after export"):
        mq.ExportResult.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = "something-else"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mq.ConfigError, match="not an mq manifest"):
        mq.ExportResult.load(copy)


def test_unavailable_and_unsuitable_runtimes_are_reported_not_hidden(exported: mq.ExportResult,
                                                                     tmp_path: Path) -> None:
    report = mq.verify(exported, ZOO["unet"].inputs(2), runtimes="all")
    assert {c.runtime for c in report.checks} >= {"onnxruntime", "onnxruntime-opt", "openvino", "tvm"}
    assert report.skipped == []
    with pytest.raises(mq.UnknownNameError, match="Installed runtimes"):
        mq.verify(exported, ZOO["unet"].inputs(2), runtimes=["nosuch"])
    # OpenVINO's FakeQuantize ONNX holds org.openvinotoolkit ops: only OpenVINO can run it, and the report says so.
    entry = ZOO["unet"]
    # 7-bit weights: openvino-int8 (in "all") runs the int8 kernels, which saturate 8-bit weights without VNNI.
    qmodel = mq.prepare(entry.build(), "openvino", entry.inputs(2), qconfig="reduce-range")
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    fake_quantize = mq.export(qmodel, entry.inputs(2), tmp_path, "openvino")
    report = mq.verify(fake_quantize, entry.inputs(2), runtimes="all")
    assert report.passed and {c.runtime for c in report.checks} == {"openvino", "openvino-int8"}
    assert sorted(s.split()[0] for s in report.skipped) == ["onnxruntime", "onnxruntime-opt", "tvm"]
    assert all("cannot run the onnx-fakequantize artifact" in s for s in report.skipped)
    assert report.table().count("\nskipped: ") == 3


def test_unquantized_outputs_use_an_8_bit_yardstick(tmp_path: Path) -> None:
    entry = ZOO["mlp_bn"]
    x = entry.inputs(4)
    qmodel = mq.prepare(entry.build(), "tensorrt", x)  # input placement: the logits stay float
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    result = mq.export(qmodel, x, tmp_path)
    assert result.manifest["outputs"] == [{"name": "output", "tensor": None}]
    (check,) = mq.verify(result, x).checks
    reference = qmodel(x).detach().numpy()
    assert check.step == pytest.approx(float(np.ptp(reference)) / 255, rel=1e-6)


def test_runtime_selection_skips_a_default_runtime_that_is_not_installed() -> None:
    backend = dataclasses.replace(mq.get_backend("qdq"), runtimes=("onnxruntime", "no-such-runtime"))
    skipped: list[str] = []
    assert [r.name for r in select_runtimes(backend, None, skipped)] == ["onnxruntime"]
    assert len(skipped) == 1 and "no-such-runtime" in skipped[0]
    assert [r.name for r in select_runtimes(backend, "tvm", skipped)] == ["tvm"]
    assert {r.name for r in select_runtimes(backend, "all", skipped)} == set(mq.list_runtimes())
    with pytest.raises(mq.UnknownNameError):
        select_runtimes(backend, ["no-such-runtime"], skipped)
    assert len(skipped) == 1
