"""The manifest of an export folder: written last by the export step, read back (and distrusted) by everything later.

``build_manifest`` records what an export holds (backend, exporter, options, files with checksums, inputs,
outputs, quantizers, versions); ``read_manifest`` and the path checks here are what ``ExportResult.load`` applies
to a folder that may come from elsewhere. The versions of mq and of the plugins are passed in by the caller
(``mq_core.pipeline.export``): this module knows nothing of plugins.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import onnx

from mq_core.errors import ConfigError
from mq_core.export.onnx_graph import Graph

if TYPE_CHECKING:
    from mq_core.export.exporter import ExportContext

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mq-manifest/1"
#: The keys every manifest has, with their types (what ``ExportResult.load`` and ``verify`` read).
MANIFEST_KEYS: dict[str, type] = {"format": str, "backend": str, "exporter": str, "files": list, "inputs": list,
                                  "outputs": list, "quantizers": dict}


def _outputs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Graph outputs with the quantized tensor each one dequantizes (None for a float output)."""
    sources = {pair.output: pair.input for pair in Graph(model).qdq_pairs() if pair.quantize is not None}
    return [{"name": o.name, "tensor": sources.get(o.name)} for o in model.graph.output]


def build_manifest(ctx: ExportContext, inputs: list[dict[str, Any]], versions: dict[str, str]) -> dict[str, Any]:
    """The manifest: backend, exporter, options, files (with checksums), inputs/outputs, quantizers, versions.

    ``versions`` (distribution -> version) is given by the caller, which knows the plugins: this module does not.
    """
    return {
        "format": MANIFEST_FORMAT,
        "backend": ctx.backend.name,
        "exporter": ctx.exporter,
        "options": dataclasses.asdict(ctx.options),
        "files": [a.to_dict(ctx.stage) for a in ctx.artifacts],
        "inputs": inputs,
        "outputs": _outputs(ctx.qdq_model),
        "quantizers": {name: entry.to_dict() for name, entry in sorted(ctx.table.items())},
        "versions": dict(versions),
    }


def _tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            yield from [attr.t] if attr.HasField("t") else []
            yield from attr.tensors
            for graph in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                yield from _graph_tensors(graph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _tensors(graph.node)


def check_self_contained(path: Path) -> None:
    """Refuse an ONNX artifact whose tensors live in external files: mq never writes one, and their locations are
    paths that could lead anywhere."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model at all
        raise ConfigError(f"artifact {path} is not a readable ONNX model ({type(exc).__name__}: {exc}); export "
                          "again.") from exc
    tensors = itertools.chain(_graph_tensors(model.graph), *(_tensors(f.node) for f in model.functions))
    external = [t.name for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ConfigError(f"artifact {path} keeps tensors {external[:5]} in external data files; mq never writes "
                          "such an ONNX (their locations are paths that may lead out of the folder): refused, "
                          "export again.")


def unsafe_path(relative: str) -> bool:
    """Whether ``relative`` is not a plain relative path (absolute, a drive, ``..``, backslashes, empty parts)."""
    parts = relative.split("/")
    return (not relative or "\\" in relative or "\0" in relative or PureWindowsPath(relative).drive != ""
            or PurePosixPath(relative).is_absolute() or any(p in ("", ".", "..") for p in parts))


def inside(out: Path, relative: str, what: str) -> Path:
    """``out / relative``, refused when ``relative`` is not a plain relative path or a symlink leads out of ``out``."""
    if unsafe_path(relative):
        raise ConfigError(f"{what} is not a plain path inside the export folder (absolute paths, '..' and empty "
                          "parts are refused); mq never writes such a manifest, so this export was altered: do not "
                          "use it, export again.")
    path = out / relative
    target = path.resolve()
    if not target.is_relative_to(out.resolve()):
        raise ConfigError(f"{what} leads out of the export folder (a symlink to {target}); refused: mq never writes "
                          "symlinks, so this export was altered: do not use it, export again.")
    return path


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked to be an mq manifest with every key of the right type."""
    out = Path(out_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{out} holds no {MANIFEST}; it is not an mq export folder (run `mq export` first).")
    inside(out, MANIFEST, str(path))
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); it is not a manifest mq wrote (or it was damaged): "
                          "export again.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path} is not an mq manifest (format {found!r}, expected {MANIFEST_FORMAT!r}).")
    problems = [f"{key!r} missing" if key not in manifest else f"{key!r} is not a {kind.__name__}"
                for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    for i, entry in enumerate(manifest.get("files") if isinstance(manifest.get("files"), list) else []):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("kind", "path", "sha256")):
            problems.append(f"files[{i}] lacks a string kind, path or sha256")
    for i, entry in enumerate(manifest.get("outputs") if isinstance(manifest.get("outputs"), list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("tensor"), str | None):
            problems.append(f"outputs[{i}] lacks a string name or tensor")
    if problems:
        raise ConfigError(f"{path} is damaged or not from this mq version: {'; '.join(problems)}. Export again "
                          "(`mq export`) with this mq.")
    return manifest


def is_export_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a ``manifest.json`` that mq wrote (so an export may replace the folder)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
