"""No path escapes its folder (issue 10, point 3; manifests from point 12).

An export folder may come from anyone: ``ExportResult.load`` (and so ``mq verify``) refuses manifest ``path``
entries that are absolute, hold ``..``, or are symlinks leading out of the folder, even when the file they name
matches its checksum, and ONNX artifacts that keep tensors in external files (their locations are paths too); a
manifest that is not JSON or lacks keys is one clear error. The ``name`` exporter option
becomes a file name, so it must be a plain file name stem: ``-o name=../../evil`` is refused before anything is
written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.export.exporter import ExportContext
from mq_core.testing.zoo import ZOO

MODEL_REF = "mq_core.testing.zoo:MLPBN"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[mq.ExportResult, Path, torch.nn.Module]:
    """A calibrated MLP, its export folder and its checkpoint."""
    entry = ZOO["mlp_bn"]
    x = entry.inputs(2)
    qmodel = mq.prepare(entry.build(), "qdq", x)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    root = tmp_path_factory.mktemp("paths")
    checkpoint = mq.save_checkpoint(qmodel, root / "qmodel.pt", x, model_ref=MODEL_REF)
    return mq.export(qmodel, x, root / "export"), checkpoint, qmodel


def tampered(exported: mq.ExportResult, folder: Path, **changes: Any) -> Path:
    """A copy of the export at ``folder / "export"`` whose first manifest file entry gets ``changes``."""
    copy = folder / "export"
    shutil.copytree(exported.out_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][0].update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_untouched_export_loads(setup) -> None:
    exported, _, _ = setup
    assert mq.ExportResult.load(exported.out_dir).artifacts == exported.artifacts


@pytest.mark.parametrize("form", ["../outside.onnx", "sub/../../outside.onnx", "absolute"])
def test_manifest_paths_out_of_the_folder_are_refused(setup, tmp_path: Path, form: str) -> None:
    exported, _, _ = setup
    outside = tmp_path / "outside.onnx"  # a real file with the right checksum: only the path gives it away
    shutil.copy(exported.path("onnx-qdq"), outside)
    path = str(outside) if form == "absolute" else form
    copy = tampered(exported, tmp_path, path=path, sha256=sha256(outside))
    with pytest.raises(mq.ConfigError, match="not a plain path inside the export folder"):
        mq.ExportResult.load(copy)


@pytest.mark.parametrize("path", ["C:/Windows/model.onnx", "sub\\..\\..\\x.onnx", "", "./model.onnx", "a//b"])
def test_manifest_paths_that_are_not_plain_relative_paths_are_refused(setup, tmp_path: Path, path: str) -> None:
    copy = tampered(setup[0], tmp_path, path=path)
    with pytest.raises(mq.ConfigError, match="not a plain path"):
        mq.ExportResult.load(copy)


def test_a_symlink_out_of_the_folder_is_refused(setup, tmp_path: Path) -> None:
    exported, _, _ = setup
    copy = tampered(exported, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.copy(exported.path("onnx-qdq"), outside)
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(outside)  # same bytes, same checksum
    with pytest.raises(mq.ConfigError, match="leads out of the export folder"):
        mq.ExportResult.load(copy)
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to("../export/manifest.json")  # a link that stays inside is only a file
    with pytest.raises(mq.ConfigError, match="modified after export"):
        mq.ExportResult.load(copy)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "weights.bin"])
def test_onnx_external_data_is_refused(setup, tmp_path: Path, location: str) -> None:
    exported, _, _ = setup
    model = onnx.load(exported.path("onnx-qdq"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    data = model.SerializeToString()
    copy = tampered(exported, tmp_path, sha256=hashlib.sha256(data).hexdigest())
    (copy / "model.onnx").write_bytes(data)
    with pytest.raises(mq.ConfigError, match=r"keeps tensors \[.*\] in external data files"):
        mq.ExportResult.load(copy)


def test_an_artifact_that_is_not_onnx_is_refused(setup, tmp_path: Path) -> None:
    copy = tampered(setup[0], tmp_path, sha256=hashlib.sha256(b"\xff" * 16).hexdigest())
    (copy / "model.onnx").write_bytes(b"\xff" * 16)
    with pytest.raises(mq.ConfigError, match="is not a readable ONNX model"):
        mq.ExportResult.load(copy)


def test_a_manifest_symlinked_from_elsewhere_is_refused(setup, tmp_path: Path) -> None:
    exported, _, _ = setup
    copy = tampered(exported, tmp_path)
    (copy / "manifest.json").rename(tmp_path / "elsewhere.json")
    (copy / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(mq.ConfigError, match="leads out of the export folder"):
        mq.ExportResult.load(copy)


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (b"[1, 2]", "is not an mq manifest"),
    (json.dumps({"format": "mq-manifest/1", "backend": "qdq"}).encode(), "'exporter' missing; 'files' missing"),
    (json.dumps({"format": "mq-manifest/1", "backend": "qdq", "exporter": "qdq", "files": [{"kind": "x", "path": 3}],
                 "inputs": [], "outputs": [{"name": 1}], "quantizers": []}).encode(),
     "'quantizers' is not a dict; files[0] lacks a string kind, path or sha256; outputs[0] lacks"),
])
def test_a_manifest_that_is_not_json_or_lacks_keys_is_one_clear_error(setup, tmp_path: Path, content: bytes,
                                                                         message: str) -> None:
    exported, checkpoint, _ = setup
    copy = tampered(exported, tmp_path)
    (copy / "manifest.json").write_bytes(content)
    with pytest.raises(mq.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mq.ExportResult.load(copy)
    result = CliRunner().invoke(cli, ["verify", str(copy), "--checkpoint", str(checkpoint), "--model", MODEL_REF])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    assert result.output.count("\n") == 1 and str(copy / "manifest.json") in result.output


def test_damaged_quantizer_entries_are_a_clear_error(setup, tmp_path: Path) -> None:
    copy = tampered(setup[0], tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["quantizers"] = {"fc": {"tensor": "fc"}}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mq.ConfigError, match=r"quantizers in .* are damaged"):
        _ = mq.ExportResult.load(copy).table


@pytest.mark.parametrize("name", ["../../evil", "/tmp/evil", "sub/model", "a\\b", "", " ", "model ", ".hidden",
                                  "..", "-rf", "x" * 65, 5, None])
def test_exporter_name_option_must_be_a_plain_file_name(setup, tmp_path: Path, name: Any) -> None:
    _, _, qmodel = setup
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(mq.ConfigError, match=r"is not a valid file name stem: it must be 1 to 64 characters"):
        mq.export(qmodel, ZOO["mlp_bn"].inputs(2), out, name=name)
    assert list(tmp_path.rglob("*")) == []  # nothing written, inside the folder or beside it


def test_exporter_name_option_on_the_command_line(setup, tmp_path: Path) -> None:
    _, checkpoint, _ = setup
    out = tmp_path / "deep" / "out"
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--model", MODEL_REF, "-o", "name=../../evil",
                                      "--out", str(out)])
    assert result.exit_code == 2 and result.output.startswith("Error: exporter option name='../../evil'")
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert list(tmp_path.rglob("*")) == []
    good = CliRunner().invoke(cli, ["export", str(checkpoint), "--model", MODEL_REF, "-o", "name=mlp-int8.v2",
                                    "--out", str(out)])
    assert good.exit_code == 0, good.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mlp-int8.v2.onnx"]


def test_an_exporter_cannot_write_outside_its_folder(setup, tmp_path: Path) -> None:
    exported, _, qmodel = setup
    ctx = ExportContext(qmodel, mq.get_backend("qdq"), "qdq", exported.qdq_model, {}, tmp_path / "stage", None)
    for filename in ["../escape.txt", "/tmp/escape.txt", "manifest.json", "sub/../../escape.txt"]:
        with pytest.raises(mq.ExportError, match=f"tried to write '{filename}'"):
            ctx.save_text(filename, "x", "text", "")
    assert list(tmp_path.rglob("*")) == []
