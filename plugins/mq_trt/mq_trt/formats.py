"""TensorRT's implicit-INT8 range files: the dynamic-range JSON and the calibration cache (writers and readers).

* dynamic-range JSON, MQBench's format: ``{"tensorrt": {"blob_range": {tensor: amax}}}``, read by a script that
  calls ``ITensor.set_dynamic_range(-amax, amax)``. amax = 127 * s, TensorRT's symmetric rule (not 128 * s, which
  one MQBench tool wrote), so TensorRT's scale amax / 127 is the simulated scale. amax is written as the exact
  float64 product; TensorRT's float32 arithmetic can land one ulp from s, the cache below carries s bit for bit;
* calibration cache, what ``IInt8EntropyCalibrator2`` writes and ``trtexec --calib=`` reads: a header
  ``TRT-<version>-EntropyCalibration2``, then ``tensor: <hex>`` per tensor, the hex being the big-endian IEEE-754
  float32 bits of the scale. TensorRT ignores a cache whose version token differs from its own
  (``NV_TENSORRT_VERSION``: major * 10000 + minor * 100 + patch since TensorRT 10, e.g. ``101401`` for 10.14.1;
  major * 1000 + minor * 100 + patch before, e.g. ``8601`` for 8.6.1), so the token must match the deploying
  TensorRT.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mq_core.plugin_api import ConfigError

#: The largest int8 level: TensorRT's symmetric activation grid maps [-amax, amax] onto it (amax = 127 * s).
QMAX = 127
CALIBRATOR = "EntropyCalibration2"
_HEADER = re.compile(r"TRT-(\d+)-(\w+)")
_DOTTED = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")


def version_token(version: str) -> str:
    """The calibration-cache version token of a TensorRT version: ``"10.3.0"`` -> ``"100300"``, ``"8.6.1"`` ->
    ``"8601"``; a token of digits is kept as given."""
    if version.isdigit():
        return version
    match = _DOTTED.fullmatch(version)
    if match is None or int(match[2]) > 99 or int(match[3] or 0) > 99:
        raise ConfigError(f"trt_version must be a TensorRT version like '10.3.0' or its cache token like '100300', "
                          f"got {version!r}.")
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def scale_hex(scale: float) -> str:
    """Big-endian IEEE-754 float32 bits of ``scale`` as 8 lowercase hex digits (0.5 -> ``3f000000``)."""
    return struct.pack(">f", float(np.float32(scale))).hex()


def dynamic_range_json(scales: dict[str, float]) -> dict[str, Any]:
    return {"tensorrt": {"blob_range": {name: QMAX * s for name, s in scales.items()}}}


def cache_header(trt_version: str) -> str:
    return f"TRT-{version_token(trt_version)}-{CALIBRATOR}"


def calibration_cache(header: str, scales: dict[str, float]) -> str:
    return header + "\n" + "".join(f"{name}: {scale_hex(s)}\n" for name, s in scales.items())


def read_dynamic_range(path: str | os.PathLike[str]) -> dict[str, float]:
    """The ``{tensor: amax}`` map of a dynamic-range JSON (``{"tensorrt": {"blob_range": {...}}}``)."""
    try:
        ranges = json.loads(Path(path).read_text())["tensorrt"]["blob_range"]
        out = {str(name): float(amax) for name, amax in ranges.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a TensorRT dynamic-range JSON "
                          f"({{'tensorrt': {{'blob_range': {{tensor: amax}}}}}}): {exc}") from None
    bad = sorted(n for n, a in out.items() if not (np.isfinite(a) and a > 0))
    if bad:
        raise ConfigError(f"{path}: amax must be a positive number, not for {bad[:8]}.")
    return out


def read_calibration_cache(path: str | os.PathLike[str]) -> tuple[str, dict[str, float]]:
    """The header and the ``{tensor: scale}`` map of a TensorRT calibration cache (hex float32 bits per line;
    TensorRT itself drops leading zeros, so 1 to 8 hex digits are read)."""
    lines = Path(path).read_text().splitlines()
    if not lines or _HEADER.fullmatch(lines[0].strip()) is None:
        raise ConfigError(f"{path} is not a TensorRT calibration cache: the first line must be "
                          f"'TRT-<version>-<calibrator>', got {lines[0][:60] if lines else 'an empty file'!r}.")
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name or _HEX.fullmatch(value) is None:
            raise ConfigError(f"{path}, line {number}: expected 'tensor: <hex float32 bits>', got {line[:80]!r}.")
        scales[name] = struct.unpack(">f", int(value, 16).to_bytes(4, "big"))[0]
    return lines[0].strip(), scales
