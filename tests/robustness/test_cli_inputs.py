"""Issue 10, point 12: every bad input to ``mq quantize`` exits 2 with one clear paragraph and no traceback.

The user's own code (the ``--model`` module, the calibration factory, the accuracy function) can fail in any way;
files can be malformed; a ``--config`` TOML file is checked exactly like the flags. Nearly every case fails
before any model work, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_harness import assert_clean_error, invoke, user_workdir

from mq_core.cli.quantize import _merge, quantize_command

USER = """
import torch
from mq_core.testing.zoo import MLPBN


def build():
    torch.manual_seed(0)
    return MLPBN()


def batches():
    return [torch.randn(8, 16) for _ in range(2)]


def raising_factory():
    raise RuntimeError("dataset server unreachable")


def failing_generator():
    yield torch.randn(8, 16)
    raise OSError("shard 2 is\\ncorrupt")


def not_iterable():
    return 42


def mixed_shapes():
    return [torch.randn(8, 16), torch.randn(8, 10)]


def too_narrow():
    return [torch.randn(8, 10)]


def eval_raises(model):
    raise KeyError("labels")


def eval_text(model):
    return "97%"


def eval_none(model):
    return None


def eval_nan(model):
    return float("nan")


def eval_tensor(model):
    return torch.tensor(float("inf"))
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    folder = user_workdir(tmp_path, monkeypatch, {
        "inputs_user": USER,
        "broken_syntax": "def build(:\n    pass\n",
        "raises_at_import": "import torch\n\nraise RuntimeError('no GPU in this container')\n",
    })
    torch.save(torch.randn(24, 16), folder / "calib.pt")
    torch.save(torch.tensor(3.0), folder / "scalar.pt")
    np.save(folder / "scalar.npy", np.float32(3.0))
    np.save(folder / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(folder / "strings.npy", np.array(["ab", "c"]))
    np.save(folder / "good.npy", np.ones((24, 16), dtype=np.float64))
    raw = (folder / "good.npy").read_bytes()
    (folder / "truncated.npy").write_bytes(raw[:-100])
    (folder / "header_only.npy").write_bytes(raw[:30])
    return folder


MODEL = ("--model", "inputs_user:build")


def case(name: str, args: tuple[str, ...], *fragments: str) -> object:
    return pytest.param(args, fragments, id=name)


@pytest.mark.parametrize(("args", "fragments"), [
    # the --model module itself
    case("model-syntax-error", ("--model", "broken_syntax:build", "--calib", "calib.pt"),
         "syntax error", "broken_syntax.py, line 1"),
    case("model-raises-at-import", ("--model", "raises_at_import:build", "--calib", "calib.pt"),
         "importing module 'raises_at_import' raised RuntimeError: no GPU in this container",
         "raises_at_import.py, line 3"),
    case("calib-module-syntax-error", (*MODEL, "--calib", "broken_syntax:batches"), "--calib", "syntax error"),
    # calibration factories
    case("calib-factory-raises", (*MODEL, "--calib", "inputs_user:raising_factory"),
         "--calib inputs_user:raising_factory raised when called", "RuntimeError: dataset server unreachable"),
    case("calib-generator-raises", (*MODEL, "--calib", "inputs_user:failing_generator"),
         "reading calibration batch 2 failed: OSError: shard 2 is corrupt"),
    case("calib-factory-not-iterable", (*MODEL, "--calib", "inputs_user:not_iterable"),
         "calibration data must be", "got a int"),
    # accuracy functions, called on the float model first: they fail before any quantization work
    case("eval-raises", (*MODEL, "--calib", "calib.pt", "--eval", "inputs_user:eval_raises"),
         "--eval 'inputs_user:eval_raises' raised on the float model: KeyError: 'labels'"),
    case("eval-returns-text", (*MODEL, "--calib", "calib.pt", "--eval", "inputs_user:eval_text"),
         "returned '97%' (str)", "finite number"),
    case("eval-returns-none", (*MODEL, "--calib", "calib.pt", "--eval", "inputs_user:eval_none"),
         "returned None (NoneType)"),
    case("eval-returns-nan", (*MODEL, "--calib", "calib.pt", "--eval", "inputs_user:eval_nan"), "returned nan (float)"),
    case("eval-returns-inf-tensor", (*MODEL, "--calib", "calib.pt", "--eval", "inputs_user:eval_tensor"),
         "returned inf (float)"),
    # malformed tensor files
    case("npy-object-array", (*MODEL, "--calib", "objects.npy"),
         "objects.npy is not a readable .npy array", "object arrays are refused"),
    case("npy-truncated", (*MODEL, "--calib", "truncated.npy"), "truncated.npy is not a readable .npy array"),
    case("npy-header-only", (*MODEL, "--calib", "header_only.npy"), "header_only.npy is not a readable .npy array"),
    case("npy-strings", (*MODEL, "--calib", "strings.npy"), "dtype <U2", "save numbers"),
    case("pt-0d-tensor", (*MODEL, "--calib", "scalar.pt"), "scalar.pt holds a single number (a 0-d tensor)"),
    case("npy-0d-array", (*MODEL, "--calib", "scalar.npy"), "scalar.npy holds a single number (a 0-d tensor)"),
    # option values
    case("batch-size-0", (*MODEL, "--calib", "calib.pt", "--batch-size", "0"),
         "--batch-size", "0 is not in the range x>=1"),
    case("batch-size-negative", (*MODEL, "--calib", "calib.pt", "--batch-size", "-4"),
         "--batch-size", "-4 is not in the range x>=1"),
    case("num-batches-0", (*MODEL, "--calib", "calib.pt", "--num-batches", "0"),
         "--num-batches", "0 is not in the range x>=1"),
    # options of a user model without --model: an error, not a demo run that ignores them
    case("calib-without-model", ("--calib", "calib.pt"), "--calib given without --model"),
    case("weights-eval-without-model", ("--weights", "w.pt", "--eval", "inputs_user:eval_nan"),
         "--weights, --eval given without --model"),
    # calibration data of the wrong shape: one paragraph naming the shapes, no page of torch traceback first
    case("calib-does-not-fit-model", (*MODEL, "--calib", "inputs_user:too_narrow"),
         "failed to run on example inputs of shape [8, 10]", "mat1 and mat2 shapes cannot be multiplied"),
    case("calib-shapes-differ", (*MODEL, "--calib", "inputs_user:mixed_shapes"), "[8, 10]", "[8, 16]"),
])
def test_bad_input_is_one_paragraph(workdir, args, fragments) -> None:
    assert_clean_error(invoke("quantize", *args, "--out", "out", "--quiet"), *fragments)


TOML_CASES = [
    ('batch_size = "abc"', ("batch_size = \"abc\" is not valid for --batch-size", "not a valid integer")),
    ("batch_size = 0", ("batch_size = 0 is not valid for --batch-size", "0 is not in the range x>=1")),
    ("batch_size = 2.5", ("batch_size = 2.5 must be an integer",)),
    ("num_batches = true", ("num_batches = true must be an integer",)),
    ('quiet = "maybe"', ("quiet = \"maybe\" is not valid for --quiet",)),
    ("quiet = 1", ("quiet = 1 must be true or false",)),
    ("skip = 5", ("skip = 5 must be a string or a list of strings",)),
    ("skip = [1]", ("skip[0] = 1 must be a string",)),
    ('model = ["a:b"]', ('model = ["a:b"] must be a single value',)),
    ("out = false", ("out = false must be a string",)),
    ("eval = 5", ("eval = 5 must be a string (it sets --eval)",)),
]


@pytest.mark.parametrize(("toml", "fragments"), [pytest.param(t, f, id=t) for t, f in TOML_CASES])
def test_config_values_are_checked_like_flags(workdir, toml, fragments) -> None:
    (workdir / "q.toml").write_text(f'calib = "calib.pt"\n{toml}\n')
    assert_clean_error(invoke("quantize", *MODEL, "--config", "q.toml"), "--config q.toml", *fragments)


def test_config_values_convert_like_flags(workdir) -> None:
    """A string is read as on the command line, and a single string stands for a one-element list."""
    (workdir / "q.toml").write_text('quiet = "no"\nskip = "fc"\nleaf_module = ["a", "b"]\nbatch_size = "8"\n')
    ctx = quantize_command.make_context("quantize", ["--config", "q.toml", "--image-size", "64"])
    merged = _merge(ctx, ctx.params)
    assert merged["quiet"] is False
    assert merged["skip"] == ("fc",) and merged["leaf_module"] == ("a", "b")
    assert merged["batch_size"] == 8 and merged["image_size"] == 64


def test_config_not_utf8(workdir) -> None:
    (workdir / "latin1.toml").write_bytes('model = "café:build"\n'.encode("latin-1"))
    assert_clean_error(invoke("quantize", "--config", "latin1.toml"), "latin1.toml is not UTF-8", "0xe9")
