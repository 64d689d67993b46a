"""Exporters, their context, artifacts and the export result (with its manifest).

An ``Exporter`` turns the canonical QDQ ONNX and its ranges table into a target's artifacts. It declares which
backends it serves and its options (a dataclass, so defaults are documented and unknown options are refused),
writes files through the ``ExportContext`` (into a staging folder that is moved into place only when everything
succeeded), and says how each artifact is run for verification (``runnables``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx
import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError
from mq_core.export.onnx_graph import Graph, save_model
from mq_core.export.quant_table import QuantTable, TensorQuant, strip_qdq
from mq_core.io import atomic_write_text
from mq_core.plugins.manager import core_version, get_manager

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mq-manifest/1"


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
        return self._add(kind, save_model(model, self.stage / filename), description)

    def save_text(self, filename: str, text: str, kind: str, description: str) -> Artifact:
        return self._add(kind, atomic_write_text(self.stage / filename, text), description)

    def save_json(self, filename: str, data: Any, kind: str, description: str) -> Artifact:
        return self.save_text(filename, json.dumps(data, indent=2, sort_keys=True) + "\n", kind, description)

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
        return {k: TensorQuant.from_dict(v) for k, v in self.manifest["quantizers"].items()}

    def path(self, kind: str) -> Path:
        for artifact in self.artifacts:
            if artifact.kind == kind:
                return artifact.path
        raise KeyError(f"this export has no {kind!r} artifact; it has {[a.kind for a in self.artifacts]}")

    @classmethod
    def load(cls, out_dir: str | Path) -> ExportResult:
        """Read an export folder back from its manifest (to verify it later, e.g. with ``mq verify``)."""
        out = Path(out_dir)
        path = out / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{out} holds no {MANIFEST}; it is not an mq export folder (run `mq export` first).")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ConfigError(f"{path} is not an mq manifest (format {manifest.get('format')!r}).")
        artifacts = [Artifact(a["kind"], out / a["path"], a.get("description", "")) for a in manifest["files"]]
        for artifact, entry in zip(artifacts, manifest["files"]):
            if not artifact.path.is_file():
                raise ConfigError(f"artifact {artifact.path} listed in the manifest is missing.")
            if hashlib.sha256(artifact.path.read_bytes()).hexdigest() != entry["sha256"]:
                raise ConfigError(f"artifact {artifact.path} was modified after export (checksum mismatch).")
        return cls(out, manifest["backend"], manifest["exporter"], artifacts, manifest)


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
        return self.Options(**options)

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
