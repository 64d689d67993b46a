"""AIMET quantization encodings, the file SNPE / QNN converters read with ``--quantization_overrides``.

Both formats describe a grid as unsigned codes ``q in [0, 2^bw - 1]`` with ``x' = (q + offset) * scale``; mq's
``(q - z) * s`` on ``[qmin, qmax]`` maps onto it as ``offset = qmin - z`` (never positive): uint8 affine with zero
point z gives ``offset = -z``; int8 symmetric (z = 0 on [-128, 127]) gives ``offset = -128``, exactly what AIMET
writes for symmetric int8. A grid must have all ``2^bw`` levels (no narrow range: the format cannot say so).

* ``"0.6.1"`` (SNPE): ``activation_encodings`` / ``param_encodings`` map a tensor name to a list of encodings, one
  per output channel for a per-channel parameter. Each is ``{bitwidth, dtype: "int", is_symmetric: "True"|"False"
  (strings), min, max, offset (int), scale}`` with ``min = offset * scale`` and ``max = (offset + 2^bw - 1) *
  scale``. mq computes min/max in double from the float32 scale, which is exact (a 24-bit mantissa times an
  integer below 2^16 fits a double), so ``(max - min) / (2^bw - 1)`` gives the scale back bit for bit.
* ``"1.0.0"`` (QNN): the two sections are lists of ``{name, dtype: "INT", enc_type: "PER_TENSOR"|"PER_CHANNEL",
  bw, is_sym (bool), scale: [...], offset: [...]}``; the offset has the same sign convention as 0.6.1 (mq writes
  it as an integer; AIMET writes the same value as a float, e.g. ``-128.0``). Per-channel lists follow the output
  channel; the file does not store the axis, so the reader takes it from the caller (default 0).

Both also carry ``excluded_layers: []`` and ``quantizer_args``, AIMET's summary of how encodings were made (JSON
booleans, as AIMET's exports write them): ``activation_bitwidth`` / ``param_bitwidth`` (widest used),
``dtype: "int"``, ``is_symmetric`` (all parameter encodings symmetric), ``per_channel_quantization`` (any
parameter per-channel) and ``quant_scheme`` (the AIMET name of the calibration: ``post_training_tf`` for min/max).
Converters read the encodings; ``quantizer_args`` is informational, for people debugging the model.

Sources for the field semantics: AIMET's encoding specification (quic/aimet
``Docs/api_docs/quantization_encoding_specification.rst``: 0.6.1 fields, e.g. ``offset -114`` with
``min = -2.109 = offset * scale``), and Qualcomm's FastForward exporter (Qualcomm-AI-research/fastforward
``src/fastforward/export/_export_schemas.py``, ``LegacySchemaHandler`` 0.6.1 / ``V1SchemaHandler`` 1.0.0, whose
``tests/export/test_export_schemas.py`` writes one symmetric int8 tensor as ``offset -128`` in 0.6.1 and
``[-128.0]`` in 1.0.0, and an asymmetric uint8 input with ``min 0.0`` as ``offset 0`` / ``[0.0]``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mq_core.plugin_api import ConfigError, QuantTable, TensorQuant, unsigned_view

LEGACY = "0.6.1"
V1 = "1.0.0"
FORMATS = (LEGACY, V1)
_SECTIONS = {"activation": "activation_encodings", "weight": "param_encodings"}
_KINDS = {section: kind for kind, section in _SECTIONS.items()}


def _channels(entry: TensorQuant) -> list[tuple[float, int]]:
    """(scale, offset) per channel (one pair per tensor), scale as the exact float32 value."""
    grid = unsigned_view(entry)
    scales = np.asarray(grid.scale, dtype=np.float32).reshape(-1)
    zeros = np.asarray(grid.zero_point).reshape(-1)
    return [(float(s), -int(z)) for s, z in zip(scales, zeros, strict=True)]


def legacy_encoding(scale: float, offset: int, bitwidth: int, symmetric: bool) -> dict[str, Any]:
    """One 0.6.1 encoding; min/max are exact products (see the module docstring)."""
    return {
        "bitwidth": bitwidth, "dtype": "int", "is_symmetric": str(bool(symmetric)),
        "min": offset * scale, "max": (offset + 2**bitwidth - 1) * scale, "offset": offset, "scale": scale,
    }


def v1_encoding(entry: TensorQuant) -> dict[str, Any]:
    channels = _channels(entry)
    return {
        "name": entry.name, "dtype": "INT", "enc_type": "PER_CHANNEL" if entry.per_channel else "PER_TENSOR",
        "bw": entry.bits, "is_sym": bool(entry.symmetric),
        "scale": [s for s, _ in channels], "offset": [o for _, o in channels],
    }


def quantizer_args(entries: Iterable[TensorQuant], quant_scheme: str) -> dict[str, Any]:
    """AIMET's ``quantizer_args`` summary of the encodings (informational)."""
    entries = list(entries)
    acts = [e for e in entries if e.kind == "activation"]
    params = [e for e in entries if e.kind == "weight"]
    return {
        "activation_bitwidth": max((e.bits for e in acts), default=8),
        "param_bitwidth": max((e.bits for e in params), default=8),
        "dtype": "int",
        "is_symmetric": bool(params) and all(e.symmetric for e in params),
        "per_channel_quantization": any(e.per_channel for e in params),
        "quant_scheme": quant_scheme,
    }


def to_aimet(entries: Iterable[TensorQuant], version: str, args: dict[str, Any]) -> dict[str, Any]:
    """The encodings document of ``entries`` (already in the order to write) in format ``version``."""
    entries = list(entries)
    if version == LEGACY:
        sections: dict[str, Any] = {"activation_encodings": {}, "param_encodings": {}}
        for e in entries:
            sections[_SECTIONS[e.kind]][e.name] = [legacy_encoding(s, o, e.bits, e.symmetric)
                                                   for s, o in _channels(e)]
    elif version == V1:
        sections = {"activation_encodings": [], "param_encodings": []}
        for e in entries:
            sections[_SECTIONS[e.kind]].append(v1_encoding(e))
    else:
        raise ConfigError(f"unknown AIMET encodings format {version!r}; mq writes {list(FORMATS)}.")
    return {"version": version, **sections, "excluded_layers": [], "quantizer_args": args}


# --- reading ----------------------------------------------------------------------------------------------------
def _entry(name: str, kind: str, bits: int, symmetric: bool, channels: list[tuple[float, float]],
           per_channel: bool, axes: Mapping[str, int]) -> TensorQuant:
    if not 1 <= bits <= 8:
        raise ConfigError(f"encoding of {name!r} has bitwidth {bits}; mq rebuilds 8-bit-or-narrower grids only.")
    scales = np.asarray([s for s, _ in channels], dtype=np.float32)
    zeros = np.asarray([-round(o) for _, o in channels], dtype=np.int64)
    axis = axes.get(name, 0) if per_channel and len(channels) > 1 else None
    if axis is None:
        scales, zeros = scales.reshape(()), zeros.reshape(())
    return TensorQuant(name=name, kind=kind, scale=scales, zero_point=zeros, qmin=0, qmax=2**bits - 1, bits=bits,
                       signed=False, symmetric=symmetric, axis=axis)


def _legacy_channels(name: str, encodings: list[dict[str, Any]]) -> list[tuple[float, float]]:
    channels = []
    for enc in encodings:
        scale, offset, bits = float(enc["scale"]), float(enc["offset"]), int(enc["bitwidth"])
        for field, expected in (("min", offset * scale), ("max", (offset + 2**bits - 1) * scale)):
            if field in enc and not math.isclose(float(enc[field]), expected, rel_tol=1e-5, abs_tol=1e-12):
                raise ConfigError(f"encoding of {name!r}: {field} {enc[field]} disagrees with offset {offset} and "
                                  f"scale {scale} (expected {expected}); the file is inconsistent.")
        channels.append((scale, offset))
    return channels


def from_aimet(document: dict[str, Any], axes: Mapping[str, int] | None = None) -> QuantTable:
    """Parse an encodings document (0.4.0-0.6.1 or 1.0.0) into a table on unsigned grids.

    ``axes`` gives the channel axis of per-channel tensors (the file does not say; default 0). Entries with
    ``dtype`` float (tensors the target keeps in floating point) are skipped.
    """
    try:
        return _parse(document, axes or {})
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"malformed AIMET encodings document ({type(exc).__name__}: {exc}).") from exc


def _parse(document: dict[str, Any], axes: Mapping[str, int]) -> QuantTable:
    version = str(document.get("version", "0.4.0"))
    table: QuantTable = {}
    for section, kind in _KINDS.items():
        value = document.get(section, [] if version == V1 else {})
        if version == V1:
            for enc in value:
                if str(enc.get("dtype", "INT")).upper() != "INT":
                    continue
                if enc["enc_type"] not in ("PER_TENSOR", "PER_CHANNEL"):
                    raise ConfigError(f"encoding of {enc['name']!r} is {enc['enc_type']}; mq reads per-tensor and "
                                      "per-channel encodings only.")
                channels = list(zip((float(s) for s in enc["scale"]), (float(o) for o in enc["offset"]),
                                    strict=True))
                table[enc["name"]] = _entry(enc["name"], kind, int(enc["bw"]), bool(enc["is_sym"]), channels,
                                            enc["enc_type"] == "PER_CHANNEL", axes)
        elif version in ("0.4.0", "0.5.0", LEGACY):
            for name, encodings in value.items():
                if any(str(e.get("dtype", "int")).lower() != "int" for e in encodings):
                    continue
                symmetric = str(encodings[0]["is_symmetric"]) == "True"
                table[name] = _entry(name, kind, int(encodings[0]["bitwidth"]), symmetric,
                                     _legacy_channels(name, encodings), True, axes)
        else:
            raise ConfigError(f"unsupported AIMET encodings version {version!r}; mq reads 0.4.0-0.6.1 and 1.0.0.")
    return table


def read_encodings(path: str | os.PathLike[str], axes: Mapping[str, int] | None = None) -> QuantTable:
    """Read an encodings file (see ``from_aimet``)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read AIMET encodings {path}: {exc}") from exc
    return from_aimet(document, axes)
