"""Issue 15, item 1: `mq analyze CHECKPOINT` - the sensitivity analysis of a saved checkpoint, its data and accuracy
read as `mq quantize` reads them, the model rebuilt as `mq export` rebuilds it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.cli.quantize import DEMO_MODEL_REF
from mq_core.demo import digits

pytestmark = pytest.mark.usefixtures("deterministic")

USER_MODULE = """
from mq_core.demo import digits

DATA = digits.load_digits()


def build():
    return digits.DigitsCNN()


def accuracy(model):
    return digits.accuracy(model, DATA.x_test[:100], DATA.y_test[:100])


def broken(model):
    raise KeyError("labels")
"""


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated checkpoint of the demo CNN (recording the demo's factory), data and a user module."""
    path = tmp_path_factory.mktemp("analyze")
    data = digits.load_digits()
    qmodel = mq.prepare(digits.pretrained("cnn"), mq.get_backend("tensorrt"), example_inputs=(data.x_test[:4],))
    mq.calibrate(qmodel, data.calibration_batches(2), progress=False)
    mq.save_checkpoint(qmodel, path / "qmodel.pt", (data.x_test[:4],), model_ref=DEMO_MODEL_REF)
    torch.save(data.x_test[:64], path / "calib.pt")
    (path / "analyzemodel.py").write_text(textwrap.dedent(USER_MODULE))
    return path


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    return workdir


def test_json_and_out_folder_hold_the_same_report(in_workdir: Path) -> None:
    result = invoke("analyze", "qmodel.pt", "--calib", "calib.pt", "--batch-size", "16", "--num-batches", "2",
                    "--bins", "8", "--out", "analysis", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads((in_workdir / "analysis" / "sensitivity.json").read_text()) == printed
    # TensorRT quantizes 4 weights and the 4 inputs of those layers
    assert printed["metric"] == "sqnr_db" and len(printed["ranking"]) == len(printed["quantizers"]) == 8
    rows = {q["name"]: q for q in printed["quantizers"]}
    assert sum(rows["x_fq"]["hist_counts"]) == 32 * 64  # two batches of 16 images of 8 x 8
    assert all(q["only_quantized"] is not None for q in rows.values())


def test_an_exact_tensor_is_strict_json(in_workdir: Path) -> None:
    torch.save(torch.zeros(8, 1, 8, 8), in_workdir / "zeros.pt")  # the input quantizer maps 0 to 0 exactly
    result = invoke("analyze", "qmodel.pt", "--calib", "zeros.pt", "--no-sweep", "--json")
    assert result.exit_code == 0, result.output
    rows = {q["name"]: q for q in json.loads(result.stdout)["quantizers"]}
    assert "Infinity" not in result.stdout and rows["x_fq"]["sqnr_db"] == "inf"


def test_demo_checkpoint_defaults_to_the_demo_data_and_accuracy(in_workdir: Path) -> None:
    result = invoke("analyze", "qmodel.pt", "--top", "3", "--no-sweep", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sensitivity by eval_fn: float 9") and "first 3 of 8" in lines[0]
    assert len(lines) == 6 and lines[1].split()[:3] == ["#", "quantizer", "role"]


def test_user_model_and_eval_function(in_workdir: Path) -> None:
    result = invoke("analyze", "qmodel.pt", "--model", "analyzemodel:build", "--calib", "calib.pt", "--eval",
                    "analyzemodel:accuracy", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "eval" and report["baseline"]["float"] > 90
    assert {type(q["only_float"]) for q in report["quantizers"]} == {float}


@pytest.mark.parametrize(("args", "message"), [
    (("--model", "analyzemodel:build"), "missing data to analyse with: pass --calib"),
    (("--calib", "calib.pt", "--eval", "analyzemodel:broken"), "--eval 'analyzemodel:broken' raised"),
    (("--calib", "nothing.pt"), "--calib nothing.pt: no such file"),
])
def test_bad_input_is_one_paragraph_and_status_2(in_workdir: Path, args: tuple[str, ...], message: str) -> None:
    result = invoke("analyze", "qmodel.pt", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_untrusted_model_ref_is_refused(in_workdir: Path) -> None:
    record = torch.load(in_workdir / "qmodel.pt", weights_only=True)
    record["model_ref"] = "analyzemodel:build"
    torch.save(record, in_workdir / "foreign.pt")
    result = invoke("analyze", "foreign.pt", "--calib", "calib.pt")
    assert result.exit_code == 2 and "--trust-model-ref" in result.output
