"""RangesFileExporter (float ONNX + a side file of ranges, read back and rebuilt as Q/DQ), check_choice, shorten.

The toy exporters below write the ranges table as JSON; they run on the real canonical export of ``TinyNet``
prepared for the core ``qdq`` backend, and their runnables run in ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mq_core as mq
from mq_core.plugin_api import (
    UINT8_AFFINE,
    ConfigError,
    ExportContext,
    ExportError,
    ExportResult,
    QuantTable,
    RangesFile,
    RangesFileExporter,
    TensorQuant,
    check_choice,
    shorten,
)
from mq_core.testing.golden import TinyNet, tiny_inputs


def read_toy(path: Path) -> QuantTable:
    return {name: TensorQuant.from_dict(d) for name, d in json.loads(path.read_text()).items()}


class ToyExporter(RangesFileExporter):
    name = "toy"
    float_description = "Float ONNX for the toy compiler."
    files = (RangesFile("toy-ranges", ".toy.json", lambda path, _axes: read_toy(path), "Toy ranges ({name})."),)
    uncovered = "have no toy range"

    @dataclass(frozen=True)
    class Options(RangesFileExporter.Options):
        pass

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        return {"toy-ranges": {e.name: e.to_dict() for e in entries}}


class DroppingExporter(ToyExporter):
    """A writer with a bug: the last tensor never reaches the file."""

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        return super().write_ranges(ctx, entries[:-1])


class DeviceWeightsExporter(ToyExporter):
    """A toolchain that reads activation ranges only and quantizes weights itself (per-tensor uint8 min/max)."""

    device_weights = UINT8_AFFINE
    propagate = False


@pytest.fixture(scope="module")
def canonical(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    torch.manual_seed(0)
    qmodel = mq.prepare(TinyNet().eval(), "qdq", tiny_inputs())
    mq.calibrate(qmodel, [tiny_inputs(batch=4)], progress=False)
    return mq.export(qmodel, tiny_inputs(), tmp_path_factory.mktemp("qdq"))


def _export(exporter: RangesFileExporter, canonical: ExportResult, stage: Path) -> ExportResult:
    """Run ``exporter`` on the canonical export's QDQ ONNX and table; the result as ``runnables`` reads it."""
    stage.mkdir()
    ctx = ExportContext(None, mq.get_backend("qdq"), exporter.name, canonical.qdq_model, canonical.table, stage,
                        exporter.parse_options({}))
    exporter.export(ctx)
    return ExportResult(stage, "qdq", exporter.name, ctx.artifacts,
                        {"quantizers": canonical.manifest["quantizers"]})


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: tiny_inputs().numpy()})[0]


def test_files_are_read_back_and_rebuilt_as_qdq_that_onnxruntime_runs(canonical: ExportResult,
                                                                      tmp_path: Path) -> None:
    result = _export(ToyExporter(), canonical, tmp_path / "toy")
    assert [(a.kind, a.path.name, a.description) for a in result.artifacts] == [
        ("onnx-float", "model.float.onnx", "Float ONNX for the toy compiler."),
        ("toy-ranges", "model.toy.json", "Toy ranges (model)."),  # description filled from the options
    ]
    written = json.loads(result.path("toy-ranges").read_text())
    assert {d["kind"] for d in written.values()} == {"activation", "weight"}
    (runnable,) = ToyExporter().runnables(result)
    assert runnable.artifact == "toy-ranges"
    assert sum(n.op_type == "QuantizeLinear" for n in runnable.model.graph.node) > 0
    # the Q/DQ rebuilt from the file compute what the canonical QDQ ONNX computes, within one output step
    (output,) = canonical.manifest["outputs"]
    step = float(canonical.table[output["tensor"]].scale)
    np.testing.assert_allclose(_run(runnable.model), _run(canonical.qdq_model), atol=step * 1.01)


def test_a_tensor_missing_from_the_written_file_is_an_export_error(canonical: ExportResult, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"read back, lacks 1 quantized tensor\(s\): \S+; the converter"):
        _export(DroppingExporter(), canonical, tmp_path / "dropping")


def test_device_weights_are_rebuilt_by_the_device_rule(canonical: ExportResult, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=__name__):  # the subclass's module logger
        result = _export(DeviceWeightsExporter(), canonical, tmp_path / "device")
    assert "have no toy range" in caplog.text  # without propagation the conv output before its ReLU is uncovered
    written = json.loads(result.path("toy-ranges").read_text())
    assert {d["kind"] for d in written.values()} == {"activation"}
    (runnable,) = DeviceWeightsExporter().runnables(result)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in runnable.model.graph.initializer}
    w = next(onnx.numpy_helper.to_array(i) for i in onnx.load(result.path("onnx-float")).graph.initializer
             if i.name == "conv.weight")
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    assert init["conv.weight_mq_scale"].shape == () and init["conv.weight_mq_zero_point"].dtype == np.uint8
    assert np.isclose(init["conv.weight_mq_scale"], (hi - lo) / 255, rtol=1e-6)
    assert np.isfinite(_run(runnable.model)).all()


def test_check_choice_names_the_option_the_choices_and_the_hint() -> None:
    check_choice("lint", "warn", ("error", "warn"))
    with pytest.raises(ConfigError) as err:
        check_choice("lint", "off", ("error", "warn"), " 'warn' writes anyway.")
    assert str(err.value) == "option lint must be one of ['error', 'warn'], got 'off'. 'warn' writes anyway."


def test_shorten_lists_the_first_items_and_marks_the_rest() -> None:
    assert shorten(["a", "b"]) == "a, b"
    assert shorten([str(i) for i in range(8)]) == "0, 1, 2, 3, 4, 5, 6, 7"
    assert shorten([str(i) for i in range(9)]) == "0, 1, 2, 3, 4, 5, 6, 7 ..."
    assert shorten(["a", "b", "c"], limit=2) == "a, b ..."
