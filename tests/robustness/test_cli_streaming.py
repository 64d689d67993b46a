"""Issue 10, point 10: the CLI streams calibration data.

``--num-batches 5`` with an endless loader takes 5 batches; an image folder is decoded one batch at a time; a
tensor file is memory-mapped and converted batch by batch; and the data can be gone over again (tracing,
calibration, PTQ and every backend each take a pass).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import assert_clean_error, invoke, user_workdir

from mq_core.cli.loading import calibration_batches
from mq_core.errors import ConfigError

USER = """
import torch
from torch import nn
from mq_core.testing.zoo import MLPBN

#: how many batches were asked of each generator endless() made
PULLS = []


def build():
    torch.manual_seed(0)
    return MLPBN()


def endless():
    PULLS.append(0)
    for _ in range(1000):
        PULLS[-1] += 1
        yield torch.randn(4, 16)
    raise RuntimeError("read 1000 batches of an endless loader")  # what reading it all would run into


def labelled():
    for _ in range(3):
        yield torch.randn(4, 16), torch.randint(0, 2, (4,))


def named():
    for _ in range(3):
        yield {"x": torch.randn(4, 16), "label": torch.randint(0, 2, (4,))}


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return user_workdir(tmp_path, monkeypatch, {"stream_user": USER})


def image_folder(folder: Path, count: int, broken: int) -> Path:
    """``count`` small RGB PNGs, of which number ``broken`` is not an image at all (decoding it fails)."""
    image = pytest.importorskip("PIL.Image", reason="reading an image folder needs Pillow")
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        if i == broken:
            path.write_bytes(b"not a png")
        else:
            image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
    return folder


def test_endless_loader_takes_num_batches(workdir: Path) -> None:
    result = invoke("quantize", "--model", "stream_user:build", "--calib", "stream_user:endless", "--num-batches",
                    "5", "--backend", "tengine", "--out", "out", "--quiet")
    assert result.exit_code == 0, result.output
    pulls = sys.modules["stream_user"].PULLS
    # every pass (the example batch, calibration) is a fresh generator; calibration took exactly 5 batches
    assert max(pulls) == 5 and all(p <= 5 for p in pulls), pulls


@pytest.mark.parametrize("factory", ["labelled", "named"])
def test_tuple_and_dict_batches_from_the_cli(workdir: Path, factory: str) -> None:
    """(x, y) tuples and dict batches follow calibration's one rule, for the traced example too."""
    result = invoke("quantize", "--model", "stream_user:build", "--calib", f"stream_user:{factory}", "--backend",
                    "qdq", "--out", "out", "--quiet")
    assert result.exit_code == 0, result.output


def test_image_folder_is_decoded_batch_by_batch(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", 6, broken=4)
    source = calibration_batches(str(folder), batch_size=2, image_size=8)
    batches = iter(source)
    first, second = next(batches), next(batches)  # img04 is in the third batch: not decoded yet
    assert first.shape == second.shape == (2, 3, 8, 8) and first.dtype == torch.float32
    with pytest.raises(ConfigError, match=r"cannot read image .*img04\.png"):
        next(batches)
    assert torch.equal(next(iter(source)), first)  # a new pass starts again from the first image
    limited = calibration_batches(str(folder), batch_size=2, image_size=8, num_batches=2)
    assert [len(list(limited)), len(list(limited))] == [2, 2]


def test_image_folder_from_the_cli(workdir: Path) -> None:
    image_folder(workdir / "images", 6, broken=4)
    common = ("quantize", "--model", "stream_user:tiny_cnn", "--calib", "images", "--batch-size", "2",
              "--image-size", "8", "--backend", "tengine", "--out", "out", "--quiet")
    result = invoke(*common, "--num-batches", "2")
    assert result.exit_code == 0, result.output
    assert_clean_error(invoke(*common), "cannot read image", "img04.png")


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_tensor_file_is_read_when_batches_are_taken(tmp_path: Path, suffix: str) -> None:
    """The file is memory-mapped: bytes changed on disk after it was opened show up in the batches."""
    path = tmp_path / f"data{suffix}"
    before = torch.arange(100, 140, dtype=torch.uint8).reshape(10, 4)
    if suffix == ".npy":
        np.save(path, before.numpy())
    else:
        torch.save(before, path)
    source = calibration_batches(str(path), batch_size=4)
    raw = path.read_bytes()
    offset = raw.index(before.numpy().tobytes())
    after = torch.arange(1, 41, dtype=torch.uint8).reshape(10, 4)
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(after.numpy().tobytes())
    batches = list(source)
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == torch.float32 for b in batches)
    assert torch.equal(torch.cat(batches), after.float())
