"""The fix-position file: for every quantized tensor, the ``p`` with ``scale = 2^-p``.

A fixed-point NPU's compiler takes a float graph and, per tensor, a bit width and a fix position; it never sees a
scale. The file (``<name>.fixpos.json``) is JSON::

    {
      "format": "mq-pot-npu-fixpos/1",
      "tensors": [
        {"bit_width": 8, "fix_pos": 5, "kind": "activation", "name": "x", "narrow_range": false},
        {"bit_width": 8, "fix_pos": 7, "kind": "weight", "name": "conv.weight", "narrow_range": true},
        ...
      ]
    }

``tensors`` is a list in the float ONNX's topological order (deterministic files diff well); names are the
float ONNX's tensor names. Codes are signed, the zero point is 0, and the integer range is
``[-2^(b-1), 2^(b-1) - 1]``, or ``[-2^(b-1) + 1, 2^(b-1) - 1]`` with ``narrow_range``.

The writer refuses what the hardware cannot represent (``ExportError``): a scale that is not exactly a power of
two, a per-channel grid, a non-zero zero point or an unsigned grid. The reader (``parse_fixpos``) is strict too
(``ConfigError``): verification runs the model rebuilt from the file as written, so what it checks is the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mq_core.plugin_api import ConfigError, ExportError, QuantTable, TensorQuant

FORMAT = "mq-pot-npu-fixpos/1"
KINDS = ("activation", "weight")


def fix_position(entry: TensorQuant) -> int:
    """The fix position ``p`` of a per-tensor, symmetric, signed entry: ``scale == 2^-p`` exactly.

    Raises ``ExportError`` when the grid is not one the NPU can run. Exactness is checked on the float32 scale
    itself (``frexp``: a power of two has mantissa 1/2), never with a tolerance: an almost-power-of-two scale
    would be silently rounded by the compiler, and the deployed model would no longer match the simulation.
    """
    where = f"tensor {entry.name!r} (quantizer {entry.quantizer or '?'})"
    if entry.per_channel or np.asarray(entry.scale).size != 1:
        raise ExportError(f"{where} is quantized per channel; the NPU has one fix position per tensor. Use "
                          "per-tensor weights (the pot-npu backend's default qconfig).")
    if not entry.signed or np.any(np.asarray(entry.zero_point) != 0):
        raise ExportError(f"{where} uses an unsigned or asymmetric grid (zero point "
                          f"{np.asarray(entry.zero_point).tolist()}); the NPU computes on signed codes with zero "
                          "point 0 (symmetric int8).")
    scale = float(np.float32(np.asarray(entry.scale).reshape(())))
    if not (math.isfinite(scale) and scale > 0):
        raise ExportError(f"{where} has scale {scale!r}; a fix position needs a positive finite scale.")
    mantissa, exponent = math.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    if mantissa != 0.5:
        raise ExportError(f"{where} has scale {scale!r}, which is not a power of two (log2 = {math.log2(scale):.6g}), "
                          "so it has no integer fix position. Prepare with a power-of-two scheme (pot_scale=True, "
                          "the pot-npu default) and do not set scales by hand.")
    return 1 - exponent


def fixpos_entry(entry: TensorQuant) -> dict[str, Any]:
    """One ``tensors`` item of the file."""
    pos = fix_position(entry)
    full_min = -(2 ** (entry.bits - 1))
    if entry.qmax != 2 ** (entry.bits - 1) - 1 or entry.qmin not in (full_min, full_min + 1):
        raise ExportError(f"tensor {entry.name!r} uses the integer range [{entry.qmin}, {entry.qmax}], which is "
                          f"neither the full nor the narrow signed {entry.bits}-bit range.")
    return {"name": entry.name, "kind": entry.kind, "bit_width": entry.bits, "fix_pos": pos,
            "narrow_range": entry.qmin == full_min + 1}


def format_fixpos(entries: Iterable[TensorQuant]) -> dict[str, Any]:
    """The whole file as a JSON-ready dict, tensors in the given order."""
    tensors = [fixpos_entry(e) for e in entries]
    names = [t["name"] for t in tensors]
    if len(set(names)) != len(names):
        raise ExportError(f"tensors listed twice: {sorted({n for n in names if names.count(n) > 1})}.")
    return {"format": FORMAT, "tensors": tensors}


def _field(item: dict[str, Any], key: str, kind: type, source: str, index: int) -> Any:
    value = item.get(key)
    # bool is a subclass of int in Python: a fix position of `true` is a broken file, not p = 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: tensors[{index}] needs {key!r} of type {kind.__name__}, got {value!r}.")
    return value


def parse_fixpos(data: Any, source: str = "fixpos file") -> QuantTable:
    """The ranges table described by a fix-position file's parsed JSON (scale ``2^-p``, zero point 0)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{source} is not a pot-npu fix-position file (format {found!r}, expected {FORMAT!r}).")
    items = data.get("tensors")
    if not isinstance(items, list):
        raise ConfigError(f"{source}: 'tensors' must be a list.")
    table: QuantTable = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: tensors[{index}] must be an object, got {item!r}.")
        name = _field(item, "name", str, source, index)
        kind = _field(item, "kind", str, source, index)
        bits = _field(item, "bit_width", int, source, index)
        pos = _field(item, "fix_pos", int, source, index)
        narrow = _field(item, "narrow_range", bool, source, index)
        if kind not in KINDS or not 2 <= bits <= 8:
            raise ConfigError(f"{source}: tensors[{index}] ({name!r}) has kind {kind!r} and bit_width {bits}; "
                              f"expected a kind in {KINDS} and 2 to 8 bits.")
        if not -127 <= pos <= 126:  # 2^-p must be a normal float32, as every scale the core computes is
            raise ConfigError(f"{source}: tensors[{index}] ({name!r}) has fix position {pos}; expected -127 to 126.")
        if name in table:
            raise ConfigError(f"{source}: tensor {name!r} is listed twice.")
        qmax = 2 ** (bits - 1) - 1
        table[name] = TensorQuant(
            name=name, kind=kind, scale=np.asarray(math.ldexp(1.0, -pos), dtype=np.float32),
            zero_point=np.asarray(0, dtype=np.int64), qmin=-qmax if narrow else -qmax - 1, qmax=qmax, bits=bits,
            signed=True, symmetric=True,
        )
    return table


def read_fixpos(path: str | os.PathLike[str]) -> QuantTable:
    """Read a ``.fixpos.json`` file (see ``parse_fixpos``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read fix-position file {path}: {exc}") from exc
    return parse_fixpos(data, str(path))
