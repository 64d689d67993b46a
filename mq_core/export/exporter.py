"""Exporters, their context, artifacts and the export result (with its manifest).

An ``Exporter`` turns the canonical QDQ ONNX and its ranges table into a target's artifacts. It declares which
backends it serves and its options (a dataclass, so defaults are documented and unknown options are refused),
writes files through the ``ExportContext`` (into a staging folder that is moved into place only when everything
succeeded), and says how each artifact is run for verification (``runnables``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import platform
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar

import onnx
import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError, ExportError
from mq_core.export.onnx_graph import Graph, save_model
from mq_core.export.quant_table import QuantTable, TensorQuant, strip_qdq
from mq_core.io import atomic_write_text
from mq_core.plugins.manager import core_version, get_manager

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mq-manifest/1"
#: What the ``name`` exporter option (the artifacts' file name stem) may be: one plain file name, no path.
FILE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_STEM_RULE = ("1 to 64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit (a plain "
                  "file name: no folders, no spaces)")
#: The keys every manifest has, with their types (what ``ExportResult.load`` and ``verify`` read).
MANIFEST_KEYS: dict[str, type] = {"format": str, "backend": str, "exporter": str, "files": list, "inputs": list,
                                  "outputs": list, "quantizers": dict}


@dataclass(frozen=True)
class Artifact:
    """One exported file."""

    kind: str
    path: Path
    description: str = ""

    def to_dict(self, root: Path) -> dict[str, Any]:
        data = self.path.read_bytes()
        return {
            "kind": self.kind, "path": self.path.relative_to(root).as_posix(), "description": self.description,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        }


@dataclass
class Runnable:
    """An ONNX model a runtime can execute to check an artifact (rebuilt from ranges files where needed)."""

    artifact: str
    model: onnx.ModelProto
    description: str = ""


@dataclass
class ExportContext:
    """What an exporter works from, and where it writes."""

    qmodel: nn.Module | None
    backend: Backend
    exporter: str
    qdq_model: onnx.ModelProto
    table: QuantTable
    stage: Path
    options: Any
    artifacts: list[Artifact] = field(default_factory=list)
    _float: tuple[onnx.ModelProto, QuantTable] | None = None

    def float_model(self) -> tuple[onnx.ModelProto, QuantTable]:
        """The canonical model with Q/DQ stripped (BN folded, dequantized weights) and its re-keyed table."""
        if self._float is None:
            self._float = strip_qdq(self.qdq_model, self.table)
        return self._float

    def save_onnx(self, filename: str, model: onnx.ModelProto, kind: str, description: str) -> Artifact:
        return self._add(kind, save_model(model, self._file(filename)), description)

    def save_text(self, filename: str, text: str, kind: str, description: str) -> Artifact:
        return self._add(kind, atomic_write_text(self._file(filename), text), description)

    def save_json(self, filename: str, data: Any, kind: str, description: str) -> Artifact:
        return self.save_text(filename, json.dumps(data, indent=2, sort_keys=True) + "\n", kind, description)

    def _file(self, filename: str) -> Path:
        """``filename`` inside the export folder; an exporter cannot write outside it or over the manifest."""
        if _unsafe(filename) or filename == MANIFEST:
            raise ExportError(f"exporter {self.exporter!r} tried to write {filename!r}, which is not a file name "
                              f"inside the export folder (or is the {MANIFEST} mq writes itself); this is a bug in "
                              "the exporter: report it to the package that provides it.")
        return self.stage / filename

    def _add(self, kind: str, path: Path, description: str) -> Artifact:
        artifact = Artifact(kind, path, description)
        self.artifacts.append(artifact)
        return artifact


@dataclass
class ExportResult:
    """What ``mq.export`` returns (and ``ExportResult.load`` reads back from an export folder)."""

    out_dir: Path
    backend: str
    exporter: str
    artifacts: list[Artifact]
    manifest: dict[str, Any]
    qmodel: nn.Module | None = None
    #: the canonical QDQ ONNX this export started from (in memory only; not set by ``load``)
    qdq_model: onnx.ModelProto | None = None

    @property
    def table(self) -> QuantTable:
        try:
            return {k: TensorQuant.from_dict(v) for k, v in self.manifest["quantizers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the quantizers in {self.out_dir / MANIFEST} are damaged ({type(exc).__name__}: "
                              f"{exc}); a manifest mq wrote never is: export again.") from exc

    def path(self, kind: str) -> Path:
        for artifact in self.artifacts:
            if artifact.kind == kind:
                return artifact.path
        raise KeyError(f"this export has no {kind!r} artifact; it has {[a.kind for a in self.artifacts]}")

    def moved_to(self, out_dir: str | Path) -> ExportResult:
        """The same result with its folder at ``out_dir`` (after the folder it was written into was renamed)."""
        out = Path(out_dir)
        artifacts = [dataclasses.replace(a, path=out / a.path.relative_to(self.out_dir)) for a in self.artifacts]
        return dataclasses.replace(self, out_dir=out, artifacts=artifacts)

    @classmethod
    def load(cls, out_dir: str | Path) -> ExportResult:
        """Read an export folder back from its manifest (to verify it later, e.g. with ``mq verify``).

        The folder may come from elsewhere, so nothing in it is trusted: the manifest must be an mq manifest with
        all its keys, every file it lists must be a plain relative path that stays inside the folder (no absolute
        path, no ``..``, no symlink leading out), and every file must match its checksum.
        """
        out = Path(out_dir)
        manifest = read_manifest(out)
        artifacts = []
        for entry in manifest["files"]:
            path = _inside(out, entry["path"], f"the file {entry['path']!r} listed in {out / MANIFEST}")
            if not path.is_file():
                raise ConfigError(f"artifact {path} listed in the manifest is missing.")
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                raise ConfigError(f"artifact {path} was modified after export (checksum mismatch).")
            if path.suffix == ".onnx":
                _check_self_contained(path)
            artifacts.append(Artifact(entry["kind"], path, entry.get("description", "")))
        return cls(out, manifest["backend"], manifest["exporter"], artifacts, manifest)


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


def _check_self_contained(path: Path) -> None:
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


def _unsafe(relative: str) -> bool:
    """Whether ``relative`` is not a plain relative path (absolute, a drive, ``..``, backslashes, empty parts)."""
    parts = relative.split("/")
    return (not relative or "\\" in relative or "\0" in relative or PureWindowsPath(relative).drive != ""
            or PurePosixPath(relative).is_absolute() or any(p in ("", ".", "..") for p in parts))


def _inside(out: Path, relative: str, what: str) -> Path:
    """``out / relative``, refused when ``relative`` is not a plain relative path or a symlink leads out of ``out``."""
    if _unsafe(relative):
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
    _inside(out, MANIFEST, str(path))
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


class Exporter:
    """Base class of exporters. Subclasses set ``name``, ``description``, ``backends`` and ``Options``.

    ``backends`` lists the backend names served; ``("*",)`` serves any backend.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("*",)

    @dataclass(frozen=True)
    class Options:
        """name: file name stem of the artifacts (``model`` -> ``model.onnx``)."""

        name: str = "model"

    def parse_options(self, options: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"exporter {self.name!r} has no option(s) {unknown}; its options are {sorted(known) or 'none'}."
            )
        parsed = self.Options(**options)
        stem = getattr(parsed, "name", None)
        if "name" in known and not (isinstance(stem, str) and FILE_STEM.fullmatch(stem)):
            raise ConfigError(f"exporter option name={stem!r} is not a valid file name stem: it must be "
                              f"{FILE_STEM_RULE}, e.g. name=resnet50-int8 (a value like 2024 is read as a number: "
                              "write name=v2024).")
        return parsed

    def serves(self, backend: Backend) -> bool:
        return "*" in self.backends or backend.name in self.backends

    def export(self, ctx: ExportContext) -> None:
        """Write the artifacts through ``ctx.save_*``."""
        raise NotImplementedError

    def runnables(self, result: ExportResult) -> list[Runnable]:
        """ONNX models that runtimes execute to verify this export; default: every ONNX artifact as written."""
        return [Runnable(a.kind, onnx.load(a.path), a.description) for a in result.artifacts
                if a.path.suffix == ".onnx"]


def versions(backend_distribution: str | None = None) -> dict[str, str]:
    data = {"mq-core": core_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "python": platform.python_version()}
    if backend_distribution and backend_distribution != "mq-core":
        record = get_manager().record_for(backend_distribution)
        if record is not None:
            data[record.distribution] = record.version
    return data


def _outputs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Graph outputs with the quantized tensor each one dequantizes (None for a float output)."""
    sources = {pair.output: pair.input for pair in Graph(model).qdq_pairs() if pair.quantize is not None}
    return [{"name": o.name, "tensor": sources.get(o.name)} for o in model.graph.output]


def build_manifest(ctx: ExportContext, inputs: list[dict[str, Any]], distribution: str) -> dict[str, Any]:
    """The manifest: backend, exporter, options, files (with checksums), inputs/outputs, quantizers, versions."""
    return {
        "format": MANIFEST_FORMAT,
        "backend": ctx.backend.name,
        "exporter": ctx.exporter,
        "options": dataclasses.asdict(ctx.options),
        "files": [a.to_dict(ctx.stage) for a in ctx.artifacts],
        "inputs": inputs,
        "outputs": _outputs(ctx.qdq_model),
        "quantizers": {name: entry.to_dict() for name, entry in sorted(ctx.table.items())},
        "versions": versions(distribution),
    }
