"""A readable account of a prepared model: which tensors are quantized, how, and in what state.

Users debugging accuracy or placement need to see the quantizers as the target sees them (one per quantized
tensor, plus one per weight), not the fx graph; ``print(mq.summary(qmodel))`` gives that table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mq_core.calibration import quantizers
from mq_core.cli.table import render_table
from mq_core.errors import ExportError
from mq_core.prepare import prepare_info
from mq_core.quant.fake_quant import FakeQuantizer


def _qparams(fq: FakeQuantizer) -> str:
    """The deploy qparams: learnable quantizers (LSQ, PACT, ...) keep theirs as parameters of their own."""
    if not fq.is_calibrated:
        return "uncalibrated"
    try:
        s, z = fq.export_qparams()
    except ExportError:  # e.g. DoReFa weights before bake_dorefa: no fixed grid over the stored weight yet
        return "no fixed grid yet (see mq.export)"
    text = f"s={s.item():.4g}" if s.numel() == 1 else f"s=[{s.min():.3g}..{s.max():.3g}] x{s.numel()}"
    if not fq.scheme.symmetric:
        text += f" z={int(z.item())}" if z.numel() == 1 else f" z=[{int(z.min())}..{int(z.max())}]"
    return text


def _switches(fq: FakeQuantizer) -> str:
    on = [name for name, flag in (("observe", fq.observe_enabled), ("quantize", fq.quant_enabled)) if flag.item()]
    return "+".join(on) or "off"


def _what(name: str, fq: FakeQuantizer, placements: dict[str, dict[str, Any]]) -> str:
    if fq.role == "weight":
        return f"weight of {name.removesuffix('.weight_fake_quant')}"
    record = placements.get(name)
    if record is None:
        return "activation"
    consumers = record["consumers"]
    target = "" if consumers == "all" else f" (into {', '.join(consumers)})"
    return f"{record['tensor']}{target}: {record['reason']}"


def summary(qmodel: nn.Module) -> str:
    """A table of every fake quantizer of a prepared model: what it quantizes and why (the placement rule),
    its grid, observer, qparams and switches, under a header with the backend, qconfig and counts."""
    info = prepare_info(qmodel)
    placements = {}
    for prefix, records in info.placements.items():
        for record in records:
            placements[f"{prefix}.{record['quantizer']}" if prefix else record["quantizer"]] = record
    found = quantizers(qmodel)
    rows = [
        [name, _what(name, fq, placements), fq.scheme.describe() + ("" if fq.exact else ", fast rounding"),
         type(fq.observer).__name__ if fq.observer is not None else "-", _qparams(fq), _switches(fq)]
        for name, fq in found.items()
    ]
    weights = sum(fq.role == "weight" for fq in found.values())
    calibrated = sum(fq.is_calibrated for fq in found.values())
    header = (f"prepared for {info.backend!r} with qconfig {info.qconfig.name!r} ({info.mode}); "
              f"{weights} weight and {len(found) - weights} activation quantizers, {calibrated} calibrated")
    table = render_table(["quantizer", "quantizes", "grid", "observer", "qparams", "enabled"], rows)
    return f"{header}\n{table}"
