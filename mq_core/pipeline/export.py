"""Pipeline step 7, export: run an exporter on a calibrated prepared model, staged and swapped in whole."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ExportError
from mq_core.export.canonical import export_qdq_onnx
from mq_core.export.exporter import ExportContext, Exporter, ExportResult
from mq_core.export.manifest import MANIFEST, build_manifest, is_export_folder
from mq_core.io import atomic_write_text, check_replaceable, check_writable, staged_directory
from mq_core.pipeline.prepare import PrepareInfo, as_inputs, prepare_info
from mq_core.plugins.lookup import get_entry, get_exporter
from mq_core.plugins.manager import core_version, get_manager
from mq_core.plugins.registry import CORE_DISTRIBUTION

__all__ = ["EXPORT_FOLDER", "export", "export_many", "versions"]


def _input_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    specs = []
    for value in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        specs.append({"name": value.name, "shape": dims,
                      "dtype": onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name})
    return specs


#: What an export may replace (see ``mq_core.io.check_replaceable``).
EXPORT_FOLDER = "an mq export folder (no manifest.json written by mq)"


def _check_out(out: Path) -> Path:
    """Fail before the (slow) ONNX export when ``out`` cannot receive an export."""
    check_replaceable(out, owned=is_export_folder, what=EXPORT_FOLDER)
    check_writable(Path(os.path.realpath(out)).parent)  # where the new folder is staged
    return out


def _exporter_for(backend: Backend, name: str | None) -> Exporter:
    chosen = get_exporter(name or backend.default_exporter)
    if not chosen.serves(backend):
        raise ExportError(
            f"exporter {chosen.name!r} serves backends {list(chosen.backends)}, but this model was prepared for "
            f"{backend.name!r}; use one of {list(backend.exporters)} or prepare the model for that backend."
        )
    return chosen


def export(
    qmodel: nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike[str],
    exporter: str | None = None,
    **options: Any,
) -> ExportResult:
    """Export a calibrated prepared model with its backend's default exporter (or ``exporter``).

    Builds the artifacts and ``manifest.json`` in a staging folder and swaps it in for ``out_dir`` in one rename:
    ``out_dir`` holds the complete new export or, on failure, exactly what it held before (see ``mq_core.io``). An
    existing ``out_dir`` is replaced only when it is empty or an earlier mq export. Returns an ``ExportResult`` for
    ``mq.verify``. ``options`` are the exporter's (see ``mq exporters``).
    """
    info = prepare_info(qmodel)
    chosen = _exporter_for(info.target, exporter)
    parsed = chosen.parse_options(options)
    info.target.check(info.qconfig)
    out = _check_out(Path(out_dir))
    qdq_model, table = export_qdq_onnx(qmodel, as_inputs(example_inputs, qmodel))
    return _run_exporter(qmodel, info, chosen, parsed, qdq_model, table, out)


def export_many(
    qmodel: nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike[str],
    exporters: list[str] | None = None,
) -> dict[str, ExportResult]:
    """Export with several exporters (default: all of the backend's), each into ``out_dir/<exporter>/``.

    The canonical QDQ ONNX is exported once and shared, which is what makes this cheaper than repeated
    ``export`` calls. Each ``out_dir/<exporter>/`` is replaced as a whole, as by ``export``.
    """
    info = prepare_info(qmodel)
    chosen = [_exporter_for(info.target, name) for name in (exporters or info.target.exporters)]
    info.target.check(info.qconfig)
    folders = {e.name: _check_out(Path(out_dir) / e.name) for e in chosen}
    qdq_model, table = export_qdq_onnx(qmodel, as_inputs(example_inputs, qmodel))
    return {e.name: _run_exporter(qmodel, info, e, e.parse_options({}), qdq_model, table, folders[e.name])
            for e in chosen}


def versions(backend_distribution: str | None = None) -> dict[str, str]:
    """What the manifest records as provenance: mq's, torch's, onnx's and Python's versions, and the version of the
    distribution that provides the backend (when it is a plugin, as the plugin manager loaded it)."""
    data = {CORE_DISTRIBUTION: core_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "python": platform.python_version()}
    if backend_distribution and backend_distribution != CORE_DISTRIBUTION:
        record = get_manager().record_for(backend_distribution)
        if record is not None:
            data[record.distribution] = record.version
    return data


def _run_exporter(
    qmodel: nn.Module, info: PrepareInfo, chosen: Exporter, parsed: Any, qdq_model: onnx.ModelProto,
    table: dict[str, Any], out: Path,
) -> ExportResult:
    backend = info.target
    with staged_directory(out, owned=is_export_folder, what=EXPORT_FOLDER) as stage:
        ctx = ExportContext(qmodel, backend, chosen.name, qdq_model, table, stage, parsed, qconfig=info.qconfig)
        chosen.export(ctx)
        provenance = versions(get_entry("backend", backend.name).distribution)
        manifest = build_manifest(ctx, _input_specs(qdq_model), provenance)
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        written = ExportResult(stage, backend.name, chosen.name, ctx.artifacts, manifest, qmodel, qdq_model)
    return written.moved_to(out)
