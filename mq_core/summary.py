"""A readable account of a prepared model: which tensors are quantized, how, and in what state.

Users debugging accuracy or placement need to see the quantizers as the target sees them (one per quantized
tensor, plus one per weight), not the fx graph; ``print(mq.summary(qmodel))`` gives that table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mq_core.errors import ExportError
from mq_core.pipeline.prepare import prepare_info
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.scheme import QuantScheme
from mq_core.quant.switches import quantizers
from mq_core.text import render_table


def _qparams(fq: FakeQuantizer) -> str:
    """The deploy qparams: learnable quantizers (LSQ, PACT, ...) keep theirs as parameters of their own."""
    if not fq.is_calibrated:
        return "uncalibrated"
    try:
        s, z = fq.export_qparams()
    except ExportError:  # e.g. DoReFa weights before bake_dorefa: no fixed grid over the stored weight yet
        return "no fixed grid yet (see mq.export)"
    return _format_qparams(s, z, fq.scheme.symmetric)


def _format_qparams(s: torch.Tensor, z: torch.Tensor, symmetric: bool) -> str:
    text = f"s={s.item():.4g}" if s.numel() == 1 else f"s=[{s.min():.3g}..{s.max():.3g}] x{s.numel()}"
    if not symmetric:
        text += f" z={int(z.item())}" if z.numel() == 1 else f" z=[{int(z.min())}..{int(z.max())}]"
    return text


def _switches(fq: FakeQuantizer) -> str:
    return _format_switches(bool(fq.observe_enabled.item()), bool(fq.quant_enabled.item()))


def _format_switches(observe: bool, quantize: bool) -> str:
    on = [name for name, flag in (("observe", observe), ("quantize", quantize)) if flag]
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


def checkpoint_summary(checkpoint: dict[str, Any]) -> str:
    """What a loaded checkpoint holds, from its data alone: no model is built and no code it names is imported, so
    it is safe on files from anywhere (``mq inspect`` shows it when the user has not trusted the model reference).
    The quantizers and their stored qparams are read from the state dict; learnable quantizers keep theirs under
    names of their own, and placement reasons need the rebuilt model (``summary``)."""
    info, state = checkpoint["info"], checkpoint["state_dict"]
    qconfig = info["qconfig"]
    rows = []
    for key in state:
        if not key.endswith(".quant_enabled"):
            continue
        name = key.removesuffix(".quant_enabled")
        role = "weight" if name.endswith("weight_fake_quant") else "activation"
        symmetric = qconfig[role]["scheme"].get("symmetric", True)
        qparams = _stored_qparams(state.get(f"{name}.scale"), state.get(f"{name}.zero_point"),
                                  state.get(f"{name}.calibrated"), symmetric)
        switches = _format_switches(_flag(state.get(f"{name}.observe_enabled")), _flag(state[key]))
        rows.append([name, role, qparams, switches])
    weights = sum(r[1] == "weight" for r in rows)
    calibrated = sum(r[2] != "uncalibrated" for r in rows)
    spec_text = {
        role: f"{QuantScheme.from_dict(qconfig[role]['scheme']).describe()}, observer {qconfig[role]['observer']}, "
              f"quantizer {qconfig[role]['fake_quantizer']}"
        for role in ("weight", "activation")
    }
    settings = [
        ["weights", spec_text["weight"]],
        ["activations", spec_text["activation"]],
        ["inputs", ", ".join(f"{s['dtype']}{s['shape']}" for s in checkpoint["inputs"])],
        ["model_ref", checkpoint.get("model_ref") or "-"],
        ["sub-modules", ", ".join(info["modules"]) or "all"],
        ["skip", ", ".join(info["skip"]) or "-"],
        ["leaf modules", ", ".join(info["leaf_modules"]) or "-"],
        ["preserved", ", ".join(info.get("preserved_attributes", [])) or "-"],
        ["rounding", "exact" if info["exact"] else "fast"],
        ["extra", ", ".join(sorted(checkpoint.get("extra", {}))) or "-"],
    ]
    header = (f"checkpoint for {info['backend']!r} with qconfig {qconfig.get('name', 'default')!r} ({info['mode']}); "
              f"{weights} weight and {len(rows) - weights} activation quantizers, {calibrated} calibrated")
    table = render_table(["quantizer", "role", "qparams (stored)", "enabled"], rows)
    return f"{header}\n{render_table(['setting', 'value'], settings)}\n{table}"



def _flag(value: torch.Tensor | None) -> bool:
    return value is not None and value.numel() == 1 and bool(value.item())


def _stored_qparams(scale: torch.Tensor | None, zero_point: torch.Tensor | None, calibrated: torch.Tensor | None,
                    symmetric: bool) -> str:
    """A quantizer's qparams as the state dict stores them (any tensor a file may hold: never raises)."""
    if not _flag(calibrated):
        return "uncalibrated"
    if scale is None or zero_point is None:
        return "learned (rebuild the model to see)"
    if not (scale.numel() == zero_point.numel() > 0 and scale.is_floating_point() and not zero_point.is_complex()):
        return "unreadable"
    return _format_qparams(scale, zero_point, symmetric)
