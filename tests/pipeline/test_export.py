"""export(): exporters get what the prepared model was prepared with, and the manifest records provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mq_core as mq
from mq_core.export.exporter import ExportContext, Exporter
from mq_core.pipeline.export import versions
from mq_core.testing.zoo import ZOO


class QConfigEcho(Exporter):
    """Writes down the qconfig and backend its context carries (what a ranges-file exporter reads them for)."""

    name = "qconfig-echo"

    def export(self, ctx: ExportContext) -> None:
        assert ctx.qconfig is not None
        ctx.save_json("seen.json", {"qconfig": ctx.qconfig.to_dict(), "backend": ctx.backend.name}, "seen", "")


@pytest.fixture(scope="module")
def calibrated() -> tuple[torch.nn.Module, torch.Tensor]:
    entry = ZOO["mlp_bn"]
    x = entry.inputs(2)
    qmodel = mq.prepare(entry.build(), "qdq", x, qconfig="reduce-range")
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    return qmodel, x


def test_the_exporter_context_carries_the_prepared_models_qconfig(
    calibrated: tuple[torch.nn.Module, torch.Tensor], tmp_path: Path
) -> None:
    qmodel, x = calibrated
    result = mq.export(qmodel, x, tmp_path / "out", exporter=QConfigEcho())  # type: ignore[arg-type]
    seen = json.loads(result.path("seen").read_text())
    info = mq.prepare_info(qmodel)
    assert info.qconfig.name == "reduce-range"  # not the backend's default: the context passes the model's own
    assert seen == {"qconfig": info.qconfig.to_dict(), "backend": "qdq"}
    assert result.manifest["backend"] == "qdq" == info.target.name


def test_versions_name_the_backends_distribution() -> None:
    core = versions("mq-core")
    assert set(core) == {"mq-core", "torch", "onnx", "python"}
    assert versions(mq.get_entry("backend", "tensorrt").distribution)["mq-trt"]
