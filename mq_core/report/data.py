"""The content of ``report.json``: one JSON-ready dict that the HTML page (``mq_core.report.html``) renders.

It gathers what one run produced: the ``mq quantize`` summary, the layer-wise verification of every export, the
sensitivity analysis (``mq.sensitivity``) and the mixed-precision choice (``--accuracy-budget``). Each part is the
``to_dict()`` of the object that made it (the schemas are in docs/getting-started.md, "The report"), so the file
is what the Python API returns, readable by any tool. Parts a run did not produce are ``None``.

JSON has no infinity or NaN, and SQNR is infinite wherever two tensors are equal: such floats are written as the
strings ``"inf"``, ``"-inf"`` and ``"nan"`` (``jsonable``), so the file is strict JSON that every parser reads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Protocol

from mq_core._version import __version__
from mq_core.errors import ConfigError

#: The top-level keys of report.json, in order.
KEYS = ("mq_version", "model", "backend", "summary", "sensitivity", "verification", "mixed_precision")


class _HasDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


Part = _HasDict | Mapping[str, Any] | None


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"`` and tuples made lists,
    so ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def as_number(value: Any) -> float | None:
    """A number of report.json back as a float (``"inf"`` -> inf); None for None and anything not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def _as_dict(part: Part, what: str) -> dict[str, Any] | None:
    if part is None:
        return None
    if isinstance(part, Mapping):
        return copy.deepcopy(dict(part))
    to_dict = getattr(part, "to_dict", None)
    if not callable(to_dict):
        raise ConfigError(f"the report's {what} must be a dict or an object with to_dict() (what mq returns for it), "
                          f"got a {type(part).__name__}.")
    return to_dict()


def _split_layers(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Move the layer-wise report of every export out of the summary (each export's ``verification`` entry) into one
    list, so report.json holds it once, under ``verification``."""
    layers = []
    for backend in summary.get("backends", []):
        for report in (backend.get("verification") or {}).values():
            found = report.pop("layers", None)
            if found is not None:
                layers.append(found)
    return layers


def report_data(*, summary: Part = None, sensitivity: Part = None, mixed_precision: Part = None,
                model: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """The report.json dict of one run.

    Args:
        summary: the ``QuantizeSummary`` of ``mq quantize`` / ``mq.quantize`` (or its ``to_dict()``); None for a
            run that quantized nothing new (``mq analyze`` of a saved checkpoint).
        sensitivity: ``mq.sensitivity``'s report (or its ``to_dict()``).
        mixed_precision: the mixed-precision result of ``--accuracy-budget`` (or its ``to_dict()``).
        model: what was quantized, as the user named it (a factory reference, a checkpoint path).
        backend: the backend the sensitivity and mixed-precision parts describe; default the summary's backends.
    """
    summary_dict = _as_dict(summary, "summary")
    layers = _split_layers(summary_dict) if summary_dict is not None else []
    if backend is None and summary_dict is not None:
        backend = ", ".join(b["backend"] for b in summary_dict.get("backends", []))
    verification = None if not layers else {
        "passed": all(layer["passed"] for layer in layers), "layers": layers}
    data = {"mq_version": __version__, "model": model or "", "backend": backend or "", "summary": summary_dict,
            "sensitivity": _as_dict(sensitivity, "sensitivity"), "verification": verification,
            "mixed_precision": _as_dict(mixed_precision, "mixed precision")}
    return jsonable(data)
