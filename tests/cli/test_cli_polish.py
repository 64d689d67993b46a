"""Issue 15, item 5: the command line's polish - --observer, --device, --input-shape, -v/-q after the command,
`mq inspect --json`, tables that fit the terminal, progress that reads well in a log, completion of registered
names, and `mq --help` without torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from mq_core.cli.main import cli
from mq_core.cli.options import Names
from mq_core.text import render_table

USER_MODULE = """
import torch
from mq_core.testing.zoo import MLPBN


def build():
    torch.manual_seed(0)
    return MLPBN()
"""


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("polish")
    (path / "polishmodel.py").write_text(textwrap.dedent(USER_MODULE))
    torch.save(torch.randn(48, 16, generator=torch.Generator().manual_seed(1)), path / "calib.pt")
    return path


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    return workdir


@pytest.fixture(scope="module")
def quantized(workdir: Path):
    """One `mq quantize` run with the new options, progress on (stderr is not a terminal under the runner)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.syspath_prepend(str(workdir))
        result = invoke("quantize", "--model", "polishmodel:build", "--calib", "calib.pt", "--backend", "tensorrt",
                        "--observer", "mse", "--input-shape", "3,16", "--device", "cpu", "--out", "out")
    assert result.exit_code == 0, result.output
    return result, workdir / "out" / "tensorrt" / "qmodel.pt"


def test_help_and_command_completion_do_not_import_torch() -> None:
    script = textwrap.dedent("""
        import os, sys
        from click.testing import CliRunner
        import mq_core, mq_core.cli.main as m
        result = CliRunner().invoke(m.cli, ["--help"])
        assert result.exit_code == 0 and "quantize" in result.output, result.output
        os.environ.update(_MQ_COMPLETE="bash_complete", COMP_WORDS="mq quantize --obs", COMP_CWORD="2")
        try:
            m.cli.main(prog_name="mq")
        except SystemExit:
            pass
        heavy = sorted(n for n in ("torch", "numpy", "onnx", "rich", "tqdm") if n in sys.modules)
        assert heavy == [], heavy
        assert callable(mq_core.prepare) and "torch" in sys.modules  # public names still import on first use
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "plain,--observer" in done.stdout


def test_observer_input_shape_and_device_reach_the_checkpoint(quantized) -> None:
    result, checkpoint = quantized
    assert "tensorrt-default, mse observer" in result.stdout
    inspected = invoke("inspect", str(checkpoint), "--json")  # model factory not confirmed: the file's data only
    assert inspected.exit_code == 0, inspected.output
    data = json.loads(inspected.stdout)
    assert data["rebuilt"] is False and "--trust-model-ref" in data["reason"]
    assert data["settings"]["inputs"] == [{"shape": [3, 16], "dtype": "float32"}]
    assert "observer mse" in data["settings"]["activations"]
    assert "observer minmax" in data["settings"]["weights"]
    calibrated = [q for q in data["quantizers"] if q["qparams"] is not None]
    assert calibrated and all(len(q["qparams"]["scale"]) == len(q["qparams"]["zero_point"]) for q in calibrated)


def test_inspect_json_of_the_rebuilt_model(quantized, in_workdir: Path) -> None:
    _, checkpoint = quantized
    inspected = invoke("inspect", str(checkpoint), "--model", "polishmodel:build", "--json")
    assert inspected.exit_code == 0, inspected.output
    data = json.loads(inspected.stdout)
    assert data["rebuilt"] is True and data["backend"] == "tensorrt"
    activations = [q for q in data["quantizers"] if q["role"] == "activation"]
    assert activations and {q["observer"] for q in activations} == {"MSEObserver"}
    weight = next(q for q in data["quantizers"] if q["role"] == "weight")
    assert weight["grid"]["per_channel"] is True and len(weight["qparams"]["scale"]) > 1
    assert set(weight["qparams"]["zero_point"]) == {0}


def test_progress_is_one_line_per_stage_when_stderr_is_not_a_terminal(quantized) -> None:
    result, _ = quantized
    assert "\r" not in result.stderr
    stages = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("tensorrt: ")]
    assert stages == ["prepare", "calibrate", "export", "verify", "sensitivity"]


def test_quiet_and_verbose_after_the_command(in_workdir: Path) -> None:
    quiet = invoke("quantize", "--model", "polishmodel:build", "--calib", "calib.pt", "--backend", "tensorrt",
                   "--out", "quiet", "-q")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""  # no progress lines
    verbose = invoke("backends", "-v")
    assert verbose.exit_code == 0 and logging.getLogger().level == logging.DEBUG
    assert invoke("-q", "backends").exit_code == 0 and logging.getLogger().level == logging.ERROR
    both = invoke("-v", "backends", "--quiet")
    assert both.exit_code == 2 and "contradict each other" in both.output


def test_observer_device_and_input_shape_from_toml_are_checked(in_workdir: Path) -> None:
    config = in_workdir / "polish.toml"
    base = 'model = "polishmodel:build"\ncalib = "calib.pt"\nbackend = "tensorrt"\nout = "toml"\nquiet = true\n'
    config.write_text(base + 'observer = "no-such-observer"\n')
    result = invoke("quantize", "--config", str(config))
    assert result.exit_code == 2 and "no-such-observer" in result.output, result.output
    config.write_text(base + "observer = 3\n")
    result = invoke("quantize", "--config", str(config))
    assert result.exit_code == 2 and "observer = 3 must be a string" in result.output, result.output
    config.write_text(base + 'input_shape = "2,a"\n')
    result = invoke("quantize", "--config", str(config))
    assert result.exit_code == 2 and "is not a shape" in result.output, result.output
    if not torch.cuda.is_available():
        config.write_text(base + 'device = "cuda"\n')
        result = invoke("quantize", "--config", str(config))
        assert result.exit_code == 2 and "sees no CUDA device" in result.output, result.output
    assert not (in_workdir / "toml" / "tensorrt").exists()


def test_registered_names_complete() -> None:
    ctx = click.Context(cli)
    param = next(p for p in cli.commands["quantize"].params if p.name == "backend")
    assert [c.value for c in Names("backend", extra=("all",)).shell_complete(ctx, param, "te")] == [
        "tengine", "tensorrt"]
    assert [c.value for c in Names("observer").shell_complete(ctx, param, "")] >= ["clip_std", "ema_minmax"]
    assert "all" in [c.value for c in Names("backend", extra=("all",)).shell_complete(ctx, param, "")]


def test_tables_fit_a_width_and_stay_whole_otherwise() -> None:
    rows = [["tensorrt", "int8 sym per-channel(0) narrow s=[0.0012..0.0431] x64", "PASS"],
            ["qdq", "uint8 affine", "FAIL"]]
    plain = render_table(["backend", "grid", "result"], rows).splitlines()
    assert [line.split()[0] for line in plain] == ["backend", "-" * len(plain[1].split()[0]), "tensorrt", "qdq"]
    assert plain[2].split()[-1] == "PASS" and "s=[0.0012..0.0431]" in plain[2]  # brackets are not markup
    narrow = render_table(["backend", "grid", "result"], rows, width=40).splitlines()
    assert max(len(line) for line in narrow) <= 40 and len(narrow) > len(plain)
    assert "".join(narrow).replace(" ", "").count("PASS") == 1
