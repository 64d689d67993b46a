"""Loading what users point the CLI at: ``pkg.module:callable`` references, weights, tensor files, image folders.

Every failure is an ``MQError`` that says what was wrong with the reference and what a correct one looks like.
Calibration data is streamed: ``calibration_batches`` reads a tensor file through a memory map, an image folder
one batch of files at a time, and a loader factory batch by batch, so a large data set is never one tensor in
memory and an endless loader works with ``--num-batches``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mq_core.errors import ConfigError, MQError, describe_exception
from mq_core.pipeline.calibrate import iter_batches
from mq_core.pipeline.resolve import import_ref, is_ref

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def parse_key_value(text: str, what: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as JSON when it parses (numbers, booleans, lists)
    and kept as a string otherwise, so ``iterations=500`` is an int and ``name=net`` a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{what} look like key=value, got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def load_object(ref: str, what: str) -> Any:
    """Resolve ``pkg.module:attr`` with ``import_ref`` (the current directory is importable, as with ``python -m``);
    whatever goes wrong in the user's module (syntax, a failing import, an exception raised at import time, a missing
    attribute) is one ``ConfigError`` naming the option, with the file and line where there is one."""
    if not is_ref(ref):
        raise ConfigError(f"--{what} must look like 'package.module:name' (e.g. 'mymodels.resnet:build'), got {ref!r}.")
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return import_ref(ref, allow_import=True)
    except SyntaxError as exc:  # also IndentationError: the file and line are in the exception itself
        raise ConfigError(
            f"--{what} {ref!r}: module {module_name!r} has a syntax error at {exc.filename}, line {exc.lineno}: "
            f"{exc.msg}. Fix the file and run again."
        ) from exc
    except ImportError as exc:
        raise ConfigError(
            f"--{what} {ref!r}: cannot import module {module_name!r} ({exc}). Check the module path and that its "
            "package is installed or in the current directory."
        ) from exc
    except AttributeError as exc:
        if module_name in sys.modules:  # imported fine (a module whose import fails is not kept): the name is missing
            raise ConfigError(f"--{what} {ref!r}: module {module_name!r} has no attribute {attr!r}.") from exc
        raise _import_failed(ref, module_name, what, exc) from exc
    except Exception as exc:
        raise _import_failed(ref, module_name, what, exc) from exc


def _import_failed(ref: str, module_name: str, what: str, exc: Exception) -> ConfigError:
    """The module's own code raised while it was imported: say where."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return ConfigError(
        f"--{what} {ref!r}: importing module {module_name!r} raised {describe_exception(exc)} (at "
        f"{frame.filename}, line {frame.lineno}). Fix the module so that importing it succeeds."
    )


def build_model(ref: str, weights: str | None = None) -> nn.Module:
    """Call the factory ``ref`` for an nn.Module and load ``weights`` (a state dict, ``weights_only=True``)."""
    factory = load_object(ref, "model")
    if not callable(factory):
        raise ConfigError(f"--model {ref!r} is not callable; point it at a function or class returning an nn.Module.")
    try:
        model = factory()
    except Exception as exc:
        raise ConfigError(f"--model {ref!r} raised when called with no arguments: {describe_exception(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {ref!r} returned {type(model).__name__}, not a torch.nn.Module.")
    if weights:
        state = load_tensor_file(weights, what="weights")
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"--weights {weights} holds a {type(state).__name__}, not a state dict.")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"--weights {weights} does not fit the model from --model {ref}: {describe_exception(exc)}"
            ) from exc
    return model.eval()


def _read_npy(file: Path, what: str, mmap: bool) -> np.ndarray:
    """A numeric ``.npy`` array, never unpickled; with ``mmap`` its data stays on disk until a slice is read."""
    try:
        array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(
            f"--{what} {file} is not a readable .npy array ({describe_exception(exc)}). Save a numeric array with "
            "numpy.save (object arrays are refused: reading them would unpickle code)."
        ) from exc
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"--{what} {file} holds an array of dtype {array.dtype}; save numbers (bool, int or float).")
    return array


def _torch_load(file: Path, what: str, mmap: bool) -> Any:
    try:  # torch can memory-map only its zip format; older files are read whole
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except Exception as exc:
        raise ConfigError(
            f"--{what} {file} cannot be loaded with torch.load(weights_only=True): {describe_exception(exc)}. Save "
            "plain tensors or state dicts (torch.save(tensor, path))."
        ) from exc


def _existing_file(path: str, what: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--{what} {path}: no such file.")
    if file.suffix not in (".npy", ".pt", ".pth"):
        raise ConfigError(f"--{what} {path}: unsupported file type {file.suffix!r}; use .pt, .pth or .npy.")
    return file


def load_tensor_file(path: str, what: str = "calib") -> Any:
    """A ``.pt``/``.pth`` file (``torch.load(weights_only=True)``) or a ``.npy`` array (as a tensor)."""
    file = _existing_file(path, what)
    if file.suffix == ".npy":
        return torch.from_numpy(_read_npy(file, what, mmap=False))
    return _torch_load(file, what, mmap=False)


class CalibrationBatches:
    """``--calib`` data: an iterable of batches that can be iterated again, reading lazily.

    ``mq quantize`` goes over the data more than once (the first batch for tracing, calibration, a PTQ method, every
    backend), so each ``iter()`` is a new pass that re-opens the source through ``open_pass``; at most
    ``num_batches`` batches are taken per pass, which is what makes an endless loader usable.
    """

    def __init__(self, open_pass: Callable[[], Iterator[Any]], num_batches: int | None = None) -> None:
        self.open_pass = open_pass
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[Any]:
        batches = self.open_pass()
        return batches if self.num_batches is None else itertools.islice(batches, self.num_batches)


def _tensor_batches(data: torch.Tensor | np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Slices of ``data`` along its first dimension, each converted to float32 only when it is taken."""
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size]
        yield torch.from_numpy(np.array(chunk, dtype=np.float32)) if isinstance(chunk, np.ndarray) else chunk.float()


def _checked_tensor(source: str, data: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    if data.ndim == 0:
        raise ConfigError(f"--calib {source} holds a single number (a 0-d tensor); save a tensor [N, ...] with the "
                          "samples along the first dimension.")
    if 0 in data.shape:
        raise ConfigError(f"--calib {source} holds an empty tensor of shape {list(data.shape)}.")
    return data


def _read_image(file: Path, size: int) -> torch.Tensor:
    """One image as a [3, size, size] float tensor in [0, 1]: RGB, shorter side resized to ``size``, center crop."""
    from PIL import Image

    try:
        with Image.open(file) as opened:
            img = opened.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError ... for a bad file
        raise ConfigError(f"--calib: cannot read image {file} ({describe_exception(exc)}); remove or fix it.") from exc
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _image_batches(files: list[Path], batch_size: int, size: int, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> Iterator[torch.Tensor]:
    """[B, 3, size, size] batches normalized with ``mean``/``std``, decoding only the files of the batch taken."""
    m = torch.tensor(mean).reshape(1, -1, 1, 1)
    s = torch.tensor(std).reshape(1, -1, 1, 1)
    for start in range(0, len(files), batch_size):
        batch = torch.stack([_read_image(f, size) for f in files[start:start + batch_size]])
        yield (batch - m) / s


def image_files(folder: Path) -> list[Path]:
    """The images of ``folder`` and its sub-folders, in a stable order; an error when there are none."""
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise ConfigError("reading an image folder needs Pillow: pip install pillow") from exc
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found.")
    return files


def _loader_passes(source: str, obj: Any, batch_size: int) -> Callable[[], Iterator[Any]]:
    """Passes over a ``pkg.module:name`` source, read by ``mq.calibration.iter_batches`` (a tensor is split into
    batches, a Dataset batched, any other iterable taken batch by batch; an error while reading names the batch).
    The factory is called once, now, and its result checked, so its errors come before any model work; when it
    returns a one-shot iterator (a generator), each later pass calls it again."""
    if not callable(obj) and isinstance(obj, Iterator):
        raise ConfigError(f"--calib {source} is an iterator that can be read only once, but mq reads calibration data "
                          "more than once; point --calib at a function that returns it.")

    def load() -> Any:
        if not callable(obj):
            return obj
        try:
            return obj()
        except MQError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"--calib {source} raised when called with no arguments: {describe_exception(exc)}"
            ) from exc

    data = load()
    pending = [iter_batches(data, batch_size=batch_size)]

    def open_pass() -> Iterator[Any]:
        if pending:
            return pending.pop()
        return iter_batches(load() if isinstance(data, Iterator) else data, batch_size=batch_size)

    return open_pass


def calibration_batches(source: str, batch_size: int, image_size: int = 224,
                        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                        std: tuple[float, ...] = (0.229, 0.224, 0.225),
                        num_batches: int | None = None) -> CalibrationBatches:
    """``--calib``: a tensor file (split into batches), an image folder, or ``pkg.module:loader_factory``, as a
    lazy, re-iterable ``CalibrationBatches`` of at most ``num_batches`` batches per pass.

    Everything that can be checked without reading the data (the file exists and holds numbers, the folder has
    images, the factory runs) is checked now.
    """
    if not source:
        raise ConfigError("--calib is empty; pass a .pt/.npy tensor file, a folder of images or 'pkg.module:factory'.")
    path = Path(source)
    if path.is_dir():
        files = image_files(path)
        return CalibrationBatches(lambda: _image_batches(files, batch_size, image_size, mean, std), num_batches)
    if ":" in source and not path.exists():
        return CalibrationBatches(_loader_passes(source, load_object(source, "calib"), batch_size), num_batches)
    file = _existing_file(source, "calib")
    data = _read_npy(file, "calib", mmap=True) if file.suffix == ".npy" else _torch_load(file, "calib", mmap=True)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        tensor = _checked_tensor(source, data)
        return CalibrationBatches(lambda: _tensor_batches(tensor, batch_size), num_batches)
    if isinstance(data, (list, tuple)) and data:
        return CalibrationBatches(lambda: iter_batches(data), num_batches)
    raise ConfigError(f"--calib {source} holds a {type(data).__name__}; save a tensor [N, ...] or a non-empty list "
                      "of batches.")
