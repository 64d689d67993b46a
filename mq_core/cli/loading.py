"""Loading what users point the CLI at: ``pkg.module:callable`` references, weights, tensor files, image folders.

Every failure is an ``MQError`` that says what was wrong with the reference and what a correct one looks like.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mq_core.errors import ConfigError

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
    """Resolve ``pkg.module:attr`` (the current directory is importable, as with ``python -m``)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--{what} must look like 'package.module:name' (e.g. 'mymodels.resnet:build'), got {ref!r}.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--{what} {ref!r}: cannot import module {module_name!r} ({exc}). Check the module path and that its "
            "package is installed or in the current directory."
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--{what} {ref!r}: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def build_model(ref: str, weights: str | None = None) -> nn.Module:
    """Call the factory ``ref`` for an nn.Module and load ``weights`` (a state dict, ``weights_only=True``)."""
    factory = load_object(ref, "model")
    if not callable(factory):
        raise ConfigError(f"--model {ref!r} is not callable; point it at a function or class returning an nn.Module.")
    try:
        model = factory()
    except Exception as exc:
        raise ConfigError(f"--model {ref!r} raised when called with no arguments: {type(exc).__name__}: {exc}") from exc
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
            raise ConfigError(f"--weights {weights} does not fit the model from --model {ref}: {exc}") from exc
    return model.eval()


def load_tensor_file(path: str, what: str = "calib") -> Any:
    """A ``.pt``/``.pth`` file (``torch.load(weights_only=True)``) or a ``.npy`` array (as a float tensor)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--{what} {path}: no such file.")
    if file.suffix == ".npy":
        return torch.from_numpy(np.load(file, allow_pickle=False))
    if file.suffix in (".pt", ".pth"):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(
                f"--{what} {path} cannot be loaded with torch.load(weights_only=True): {exc}. Save plain tensors or "
                "state dicts (torch.save(tensor, path))."
            ) from exc
    raise ConfigError(f"--{what} {path}: unsupported file type {file.suffix!r}; use .pt, .pth or .npy.")


def load_images(folder: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images of a folder as one [N, 3, size, size] batch: RGB, resized (shorter side) and center-cropped to
    ``size``, scaled to [0, 1], then normalized with ``mean``/``std`` (ImageNet's by default)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("reading an image folder needs Pillow: pip install pillow") from exc
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found.")
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    batch = torch.stack(out)
    m = torch.tensor(mean).reshape(1, -1, 1, 1)
    s = torch.tensor(std).reshape(1, -1, 1, 1)
    return (batch - m) / s


def calibration_batches(source: str, batch_size: int, image_size: int = 224,
                        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                        std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> list[Any]:
    """``--calib``: a tensor file (split into batches), an image folder, or ``pkg.module:loader_factory``."""
    path = Path(source)
    if path.is_dir():
        return list(load_images(path, image_size, mean, std).split(batch_size))
    if ":" in source and not path.exists():
        factory: Callable[[], Any] = load_object(source, "calib")
        data = factory() if callable(factory) else factory
        return list(data)
    data = load_tensor_file(source)
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            raise ConfigError(f"--calib {source} holds an empty tensor.")
        return list(data.float().split(batch_size))
    if isinstance(data, (list, tuple)):
        return list(data)
    raise ConfigError(f"--calib {source} holds a {type(data).__name__}; save a tensor [N, ...] or a list of batches.")
