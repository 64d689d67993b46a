"""`mq quantize`, `mq export`, `mq verify` on a user model: results, config files, and errors without tracebacks."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mq_core.cli.main import cli

USER_MODULE = """
import torch
from torch import nn
from mq_core.testing.zoo import MLPBN


def build():
    torch.manual_seed(0)
    return MLPBN()


def eval_fn(model):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    return 100.0 * float((model(x).argmax(1) == build().eval()(x).argmax(1)).float().mean())


class ShapeGate(nn.Module):
    def forward(self, x):
        return x * 2 if x.dim() == 2 else x  # shape-dependent: fx cannot trace it, torch.export can


class ValueGate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # value-dependent: no exported graph can express it


class Gated(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.gate = gate

    def forward(self, x):
        return self.gate(self.fc(x))


def untraceable():
    return Gated(ShapeGate())


def value_dependent():
    return Gated(ValueGate())


def loader():
    return [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a user model module, its weights and calibration data; it is the current directory."""
    (tmp_path / "usermodel.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermodel", None)
    import usermodel

    torch.save(usermodel.build().state_dict(), tmp_path / "weights.pt")
    torch.save(torch.randn(48, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "calib.pt")
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.output[result.output.find("Error: "):].strip()  # after any progress bar of earlier stages
    assert message.startswith("Error: ") and message.count("\n") == 0, result.output
    for fragment in fragments:
        assert fragment in message, message


def test_quantize_user_model_json_summary(workdir: Path) -> None:
    result = invoke("quantize", "--model", "usermodel:build", "--weights", "weights.pt", "--calib", "calib.pt",
                    "--eval", "usermodel:eval_fn", "--backend", "snpe", "--out", "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["passed"] and summary["float_accuracy"] == 100.0
    (backend,) = summary["backends"]
    assert backend["backend"] == "snpe" and backend["simulated_accuracy"] > 80
    assert backend["deployed_accuracy"] == pytest.approx(backend["simulated_accuracy"], abs=5)
    assert set(backend["artifacts"]) == {"snpe", "qnn"}
    assert Path(backend["checkpoint"]).is_file()
    for report in backend["verification"].values():
        assert report["passed"] and report["checks"]


def test_text_summary_reports_agreement_per_runtime(workdir: Path) -> None:
    result = invoke("quantize", "--model", "usermodel:build", "--calib", "calib.pt", "--eval", "usermodel:eval_fn",
                    "--out", "out", "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "sim vs runtime: max steps (exact)" in lines[2]
    row = next(line for line in lines if line.startswith("qdq "))
    # ONNX Runtime and TVM compute exactly what the simulation computes.
    assert "onnxruntime 0 (100.0% exact)" in row and "tvm 0 (100.0% exact)" in row and row.rstrip().endswith("PASS")
    assert any(line.split()[1:] == ["onnx-qdq", "out/qdq/qdq/model.onnx"] for line in lines if line.startswith("  qdq"))
    assert lines[-1].startswith("PASS")


def test_config_file_keys_and_flags_win(workdir: Path) -> None:
    (workdir / "q.toml").write_text(textwrap.dedent("""
        [quantize]
        model = "usermodel:build"
        calib = "usermodel:loader"
        backend = "tengine"
        out = "from-config"
        quiet = true
    """))
    result = invoke("quantize", "--config", "q.toml", "--backend", "qdq", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [b["backend"] for b in summary["backends"]] == ["qdq"]
    assert summary["out_dir"] == "from-config"
    (workdir / "bad.toml").write_text('backend = "qdq"\ncolour = "red"\n')
    assert_clean_error(invoke("quantize", "--config", "bad.toml"), "unknown key(s) ['colour']")


def test_ptq_method_with_options_from_flags_and_config(workdir: Path) -> None:
    common = ("quantize", "--model", "usermodel:build", "--calib", "calib.pt", "--qconfig", "w4a8", "--quiet")
    result = invoke(*common, "--method", "adaround", "--method-option", "iterations=20",
                    "--method-option", "batch_size=8", "--out", "ada", "--json")
    assert result.exit_code == 0, result.output
    (backend,) = json.loads(result.output)["backends"]
    assert backend["method"] == "adaround" and backend["passed"]
    # Values reach the method's config typed: a negative number is refused by the config, an unknown key by name.
    assert_clean_error(invoke(*common, "--method", "adaround", "--method-option", "lr=-1"), "must be positive")
    assert_clean_error(invoke(*common, "--method", "brecq", "--method-option", "colour=red"),
                       "has no option(s) ['colour']")
    assert_clean_error(invoke(*common, "--method-option", "iterations=20"), "without --method")
    assert_clean_error(invoke(*common, "--method", "adaround", "--method-option", "iterations=abc"),
                       "option iterations must be an integer")
    (workdir / "m.toml").write_text(textwrap.dedent("""
        [quantize]
        method = "qdrop"
        [quantize.method_options]
        iterations = 20
        drop_prob = 7
    """))
    assert_clean_error(invoke(*common, "--config", "m.toml"), "drop_prob is a probability")
    qdrop = invoke(*common, "--config", "m.toml", "--method-option", "drop_prob=0.5", "--out", "qd", "--json")
    assert qdrop.exit_code == 0, qdrop.output
    assert json.loads(qdrop.output)["backends"][0]["method"] == "qdrop"
    # A table beside [quantize] would be silently ignored: refused instead.
    (workdir / "stray.toml").write_text('[quantize]\nmethod = "qdrop"\n[method_options]\niterations = 20\n')
    assert_clean_error(invoke(*common, "--config", "stray.toml"), "outside the [quantize] table")
    (workdir / "flat.toml").write_text('method = "qdrop"\nmethod_options = "iterations=20"\n')
    assert_clean_error(invoke(*common, "--config", "flat.toml"), "method_options must be a table")


def test_method_options_are_checked_before_any_work(workdir: Path) -> None:
    """A bad option fails in a second with exit status 2, even for --backend all, before the model is built."""
    result = invoke("quantize", "--model", "nosuch.module:build", "--calib", "calib.pt", "--backend", "all",
                    "--method", "brecq", "--method-option", "blocks=[1]")
    assert_clean_error(result, "option blocks must be a list of names")
    assert_clean_error(invoke("quantize", "--method", "nosuch"), "unknown PTQ method 'nosuch'")


def test_bad_model_reference(workdir: Path) -> None:
    assert_clean_error(invoke("quantize", "--model", "nosuchpackage.models:build", "--calib", "calib.pt"),
                       "cannot import module 'nosuchpackage.models'")
    assert_clean_error(invoke("quantize", "--model", "usermodel", "--calib", "calib.pt"), "package.module:name")
    assert_clean_error(invoke("quantize", "--model", "usermodel:nothing", "--calib", "calib.pt"),
                       "has no attribute 'nothing'")


def test_untraceable_model_says_where_and_how_to_fix(workdir: Path) -> None:
    result = invoke("quantize", "--model", "usermodel:untraceable", "--calib", "calib.pt", "--out", "o",
                    "--capture", "fx")
    assert_clean_error(result, "could not trace", "'gate'", "usermodel.py", "--leaf-module")
    # the default capture falls back to torch.export, which specialises the shape branch
    assert invoke("quantize", "--model", "usermodel:untraceable", "--calib", "calib.pt", "--out", "a",
                  "--quiet").exit_code == 0
    fixed = invoke("quantize", "--model", "usermodel:untraceable", "--calib", "calib.pt", "--out", "o",
                   "--leaf-module", "gate", "--quiet")
    assert fixed.exit_code == 0, fixed.output
    unexportable = invoke("quantize", "--model", "usermodel:value_dependent", "--calib", "calib.pt", "--out", "v",
                          "--leaf-module", "gate", "--quiet")
    assert_clean_error(unexportable, "could not export", "torch.where")
    assert not (Path("v") / "qdq" / "qdq").exists()


def test_missing_or_empty_calibration_data(workdir: Path) -> None:
    assert_clean_error(invoke("quantize", "--model", "usermodel:build"), "missing calibration data")
    assert_clean_error(invoke("quantize", "--model", "usermodel:build", "--calib", "nope.pt"), "no such file")
    torch.save(torch.empty(0, 16), workdir / "empty.pt")
    assert_clean_error(invoke("quantize", "--model", "usermodel:build", "--calib", "empty.pt"), "empty")


def test_uninstalled_backend_names_the_package(workdir: Path, plugin_env) -> None:
    plugin_env(MQ_DISABLE_PLUGINS="1")
    result = invoke("quantize", "--model", "usermodel:build", "--calib", "calib.pt", "--backend", "openvino")
    assert_clean_error(result, "pip install mq-openvino")


def test_export_and_verify_from_checkpoint(workdir: Path) -> None:
    assert invoke("quantize", "--model", "usermodel:build", "--calib", "calib.pt", "--backend", "tensorrt",
                  "--out", "out", "--quiet").exit_code == 0
    checkpoint = workdir / "out" / "tensorrt" / "qmodel.pt"
    # the checkpoint records usermodel:build; mq calls a factory named by a file only when the user confirms it
    assert_clean_error(invoke("export", str(checkpoint)), "'usermodel:build'", "--trust-model-ref")
    inspected = invoke("inspect", str(checkpoint), "--trust-model-ref")
    assert inspected.exit_code == 0, inspected.output
    assert inspected.output.startswith("prepared for 'tensorrt' with qconfig 'tensorrt-default' (ptq)")
    assert "weight of" in inspected.output and "int8 sym per-channel(0) narrow" in inspected.output
    exported = invoke("export", str(checkpoint), "--exporter", "tensorrt-legacy", "-o", "trt_version=8.6.1",
                      "--out", "legacy", "--trust-model-ref")
    assert exported.exit_code == 0, exported.output
    assert (workdir / "legacy" / "model.calibration.cache").read_text().startswith("TRT-8601-EntropyCalibration2")
    verified = invoke("verify", "legacy", "--checkpoint", str(checkpoint), "--model", "usermodel:build", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["passed"]
    cache = workdir / "legacy" / "model.calibration.cache"
    cache.write_text(cache.read_text() + "tampered: 3f800000\n")
    assert_clean_error(invoke("verify", "legacy", "--checkpoint", str(checkpoint), "--trust-model-ref"),
                       "modified after export")
    assert_clean_error(invoke("export", str(checkpoint), "-o", "colour=red", "--out", "x", "--trust-model-ref"),
                       "no option(s) ['colour']")
