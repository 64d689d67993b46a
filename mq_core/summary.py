"""A readable account of a prepared model: which tensors are quantized, how, and in what state.

Users debugging accuracy or placement need to see the quantizers as the target sees them (one per quantized
tensor, plus one per weight), not the fx graph; ``print(mq.summary(qmodel))`` gives that table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mq_core.errors import ExportError
from mq_core.pipeline.prepare import prepare_info, qconfig_names
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


def _qparams_data(fq: FakeQuantizer) -> dict[str, list[float] | list[int]] | None:
    """The deploy qparams as lists (None when uncalibrated or without a fixed grid yet)."""
    if not fq.is_calibrated:
        return None
    try:
        s, z = fq.export_qparams()
    except ExportError:
        return None
    return {"scale": s.detach().flatten().tolist(), "zero_point": [int(v) for v in z.detach().flatten().tolist()]}


def summary_data(qmodel: nn.Module) -> dict[str, Any]:
    """``summary`` as data (``mq inspect --json``): the backend, qconfig and mode, and per quantizer what it
    quantizes and why, its grid, observer, qparams (scale and zero point lists, None when uncalibrated) and
    switches."""
    info = prepare_info(qmodel)
    placements = {}
    for prefix, records in info.placements.items():
        for record in records:
            placements[f"{prefix}.{record['quantizer']}" if prefix else record["quantizer"]] = record
    found = quantizers(qmodel)
    return {
        "backend": info.backend, "qconfig": info.qconfig_name, "mode": info.mode,
        "quantizers": [
            {"name": name, "role": fq.role, "quantizes": _what(name, fq, placements), "grid": fq.scheme.to_dict(),
             "grid_text": fq.scheme.describe() + ("" if fq.exact else ", fast rounding"),
             "observer": type(fq.observer).__name__ if fq.observer is not None else None,
             "calibrated": bool(fq.is_calibrated), "qparams": _qparams_data(fq), "qparams_text": _qparams(fq),
             "observe": bool(fq.observe_enabled.item()), "quantize": bool(fq.quant_enabled.item())}
            for name, fq in found.items()
        ],
    }


def summary(qmodel: nn.Module) -> str:
    """A table of every fake quantizer of a prepared model: what it quantizes and why (the placement rule),
    its grid, observer, qparams and switches, under a header with the backend, qconfig and counts."""
    data = summary_data(qmodel)
    found = data["quantizers"]
    rows = [[q["name"], q["quantizes"], q["grid_text"], q["observer"] or "-", q["qparams_text"],
             _format_switches(q["observe"], q["quantize"])] for q in found]
    weights = sum(q["role"] == "weight" for q in found)
    calibrated = sum(q["calibrated"] for q in found)
    header = (f"prepared for {data['backend']!r} with qconfig {data['qconfig']!r} ({data['mode']}); "
              f"{weights} weight and {len(found) - weights} activation quantizers, {calibrated} calibrated")
    table = render_table(["quantizer", "quantizes", "grid", "observer", "qparams", "enabled"], rows)
    return f"{header}\n{table}"


def checkpoint_data(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a loaded checkpoint holds, from its data alone, as data (``mq inspect --json`` without a rebuilt
    model); never builds the model nor imports what the file names (see ``checkpoint_summary``)."""
    info, state = checkpoint["info"], checkpoint["state_dict"]
    qconfig = info["qconfig"]
    found = []
    for key in state:
        if not key.endswith(".quant_enabled"):
            continue
        name = key.removesuffix(".quant_enabled")
        role = "weight" if name.endswith("weight_fake_quant") else "activation"
        symmetric = qconfig[role]["scheme"].get("symmetric", True)
        scale, zero_point = state.get(f"{name}.scale"), state.get(f"{name}.zero_point")
        text = _stored_qparams(scale, zero_point, state.get(f"{name}.calibrated"), symmetric)
        readable = text not in ("uncalibrated", "unreadable") and scale is not None and zero_point is not None
        found.append({
            "name": name, "role": role, "qparams_text": text,
            "qparams": {"scale": scale.detach().flatten().tolist(),
                        "zero_point": zero_point.detach().flatten().tolist()} if readable else None,
            "observe": _flag(state.get(f"{name}.observe_enabled")), "quantize": _flag(state[key]),
        })
    return {
        "backend": info["backend"], "mode": info["mode"],
        "qconfig": qconfig_names(qconfig.get("name", "default"), {
            p: None if q is None else q.get("name", "default") for p, q in info.get("layer_qconfigs", {}).items()}),
        "settings": {
            "weights": _spec_text(qconfig["weight"]), "activations": _spec_text(qconfig["activation"]),
            "inputs": [{"shape": list(s["shape"]), "dtype": s["dtype"]} for s in checkpoint["inputs"]],
            "model_ref": checkpoint.get("model_ref"), "modules": list(info["modules"]), "skip": list(info["skip"]),
            "leaf_modules": list(info["leaf_modules"]),
            "preserved_attributes": list(info.get("preserved_attributes", [])),
            "rounding": "exact" if info["exact"] else "fast", "extra": sorted(checkpoint.get("extra", {})),
        },
        "quantizers": found,
    }


def _spec_text(spec: dict[str, Any]) -> str:
    return (f"{QuantScheme.from_dict(spec['scheme']).describe()}, observer {spec['observer']}, "
            f"quantizer {spec['fake_quantizer']}")


def checkpoint_summary(checkpoint: dict[str, Any]) -> str:
    """What a loaded checkpoint holds, from its data alone: no model is built and no code it names is imported, so
    it is safe on files from anywhere (``mq inspect`` shows it when the user has not trusted the model reference).
    The quantizers and their stored qparams are read from the state dict; learnable quantizers keep theirs under
    names of their own, and placement reasons need the rebuilt model (``summary``)."""
    data = checkpoint_data(checkpoint)
    found, settings = data["quantizers"], data["settings"]
    rows = [[q["name"], q["role"], q["qparams_text"], _format_switches(q["observe"], q["quantize"])] for q in found]
    weights = sum(q["role"] == "weight" for q in found)
    calibrated = sum(q["qparams_text"] != "uncalibrated" for q in found)
    setting_rows = [
        ["weights", settings["weights"]],
        ["activations", settings["activations"]],
        ["inputs", ", ".join(f"{s['dtype']}{s['shape']}" for s in settings["inputs"])],
        ["model_ref", settings["model_ref"] or "-"],
        ["sub-modules", ", ".join(settings["modules"]) or "all"],
        ["skip", ", ".join(settings["skip"]) or "-"],
        ["leaf modules", ", ".join(settings["leaf_modules"]) or "-"],
        ["preserved", ", ".join(settings["preserved_attributes"]) or "-"],
        ["rounding", settings["rounding"]],
        ["extra", ", ".join(settings["extra"]) or "-"],
    ]
    header = (f"checkpoint for {data['backend']!r} with qconfig {data['qconfig']!r} ({data['mode']}); "
              f"{weights} weight and {len(found) - weights} activation quantizers, {calibrated} calibrated")
    table = render_table(["quantizer", "role", "qparams (stored)", "enabled"], rows)
    return f"{header}\n{render_table(['setting', 'value'], setting_rows)}\n{table}"


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
