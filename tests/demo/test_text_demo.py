"""The text demo: a plain-torch transformer encoder learns the embedded sentiment task in seconds, and
``mq quantize --demo text`` takes it end to end (prepare, calibrate, export, verify, accuracy) offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mq_core.cli.main import cli
from mq_core.demo import text
from mq_core.demo.digits import accuracy


def test_the_task_is_held_out_balanced_and_tokenized() -> None:
    data = text.load_text()
    assert not set(data.test_sentences) & set(text.sentences(4000, 0)[0])  # held-out sentences only
    assert 0.4 < float(data.y_train.float().mean()) < 0.6
    ids = text.tokenize(["the movie was not good", "the movie was good but the food was awful"])
    assert ids.dtype == torch.int64 and ids.shape == (2, text.MAX_LENGTH)
    assert ids[0, 0] == text.CLS and (ids[0, 6:] == text.PAD).all() and text.UNK not in ids


def test_quantize_demo_text_for_qdq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI command as a user runs it, in a fresh process with a private cache, where ``transformers`` and
    scikit-learn cannot be imported (the demo needs neither). Only mq-core's own plugins (ONNX Runtime verifies):
    OpenVINO and TVM compiles of the encoder are what the other backends' tests pay for."""
    blocked = tmp_path / "blocked"
    for package in ("transformers", "sklearn"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} is blocked in this test')\n")
    env = {**os.environ, "MQ_CACHE_DIR": str(tmp_path / "cache"), "MQ_DISABLE_PLUGINS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(blocked), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "mq_core", "quantize", "--demo", "text", "--backend", "qdq", "--out",
                          str(out), "--no-report", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    summary = json.loads(run.stdout)
    float_accuracy = summary["float_accuracy"]
    outcome = summary["backends"][0]
    assert float_accuracy >= 97.0
    assert outcome["simulated_accuracy"] >= float_accuracy - 1.0
    assert outcome["deployed_accuracy"] == pytest.approx(outcome["simulated_accuracy"], abs=0.2)
    assert (out / "qdq" / "qdq" / "model.onnx").is_file()

    monkeypatch.setenv("MQ_CACHE_DIR", str(tmp_path / "cache"))
    model = text.pretrained()  # the weights the command trained and cached, loaded
    data = text.load_text()
    assert accuracy(model, data.x_test, data.y_test) == pytest.approx(float_accuracy)
    # the same words, opposite meanings: word order and negation decide, which a bag of words cannot tell apart
    pairs = [("the food was good but the service was bad", 0), ("the service was bad but the food was good", 1),
             ("the movie was not very good", 0), ("the movie was very good", 1)]
    with torch.no_grad():
        predicted = model(text.tokenize([sentence for sentence, _ in pairs])).argmax(1)
    assert predicted.tolist() == [label for _, label in pairs]


def test_demo_and_model_are_exclusive() -> None:
    result = CliRunner().invoke(cli, ["quantize", "--demo", "text", "--model", "usermodel:build"])
    assert result.exit_code == 2 and "--demo text and --model given together" in result.output
