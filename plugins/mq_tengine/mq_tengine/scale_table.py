"""Tengine's activation scale table: one line ``name scale zero_point`` per activation tensor.

Tengine's quant tool (``quant_tool_uint8 -s table``; ``tools/quantize/quant_save_graph.cpp`` in OAID/Tengine)
takes the first space-separated token as the tensor name, ``atof`` of the text after it as the scale and
``atof`` of the last token as the zero point, so names must not contain whitespace. Codes are uint8: the zero
point is that of the grid on ``[0, 255]`` (``unsigned_view``: an int8 symmetric tensor is written with zero point
128).

Scales are written with numpy's shortest round-trip representation of the float32 value in positional notation
(``np.format_float_positional(np.float32(s), unique=True)``: ``0.1`` for float32(0.1)); parsing it back as a
double and rounding to float32 (what ``atof`` into a ``float`` does) gives the same float32 bit for bit, and
positional notation avoids exponents that simple parsers mishandle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mq_core.plugin_api import ConfigError, ExportError, QuantTable, TensorQuant, unsigned_view


def format_scale(scale: float) -> str:
    """Shortest positional text that parses back to the same float32."""
    return np.format_float_positional(np.float32(scale), unique=True, trim="-")


def scale_line(entry: TensorQuant) -> str:
    """The table line of one per-tensor, 8-bit activation entry."""
    if entry.per_channel:
        raise ExportError(f"tensor {entry.name!r} is quantized per channel; Tengine's scale table holds one scale "
                          "per activation tensor. Use per-tensor activations for Tengine.")
    if entry.bits != 8:
        raise ExportError(f"tensor {entry.name!r} is quantized with {entry.bits} bits; Tengine_u8 runs 8-bit "
                          "activations only.")
    if entry.name != entry.name.strip() or len(entry.name.split()) != 1:
        raise ExportError(f"tensor name {entry.name!r} contains whitespace, which Tengine's scale table cannot "
                          "hold (the name is the first space-separated token); rename the module.")
    grid = unsigned_view(entry)
    return f"{entry.name} {format_scale(float(grid.scale))} {int(grid.zero_point)}"


def format_scale_table(entries: Iterable[TensorQuant]) -> str:
    """The whole table, one line per entry in the given order, newline-terminated."""
    return "".join(f"{scale_line(e)}\n" for e in entries)


def parse_scale_table(text: str, source: str = "scale table") -> QuantTable:
    """Activation entries (uint8 on [0, 255]) of a scale table's text; blank lines are skipped."""
    table: QuantTable = {}
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 3:
            raise ConfigError(f"{source} line {number}: expected 'name scale zero_point', got {line!r}.")
        name, scale_text, zero_text = tokens
        try:
            scale, zero = np.float32(float(scale_text)), float(zero_text)
        except ValueError as exc:
            raise ConfigError(f"{source} line {number}: {exc}") from exc
        if not (np.isfinite(scale) and scale > 0 and zero.is_integer() and 0 <= zero <= 255):
            raise ConfigError(f"{source} line {number}: scale must be a positive number and the zero point an "
                              f"integer in [0, 255], got {line!r}.")
        if name in table:
            raise ConfigError(f"{source} line {number}: tensor {name!r} is listed twice.")
        table[name] = TensorQuant(
            name=name, kind="activation", scale=np.asarray(scale, dtype=np.float32),
            zero_point=np.asarray(int(zero), dtype=np.int64), qmin=0, qmax=255, bits=8, signed=False,
            symmetric=False,
        )
    return table


def read_scale_table(path: str | os.PathLike[str]) -> QuantTable:
    """Read a scale table file (see ``parse_scale_table``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read Tengine scale table {path}: {exc}") from exc
    return parse_scale_table(text, str(path))
