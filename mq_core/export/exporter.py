"""Exporters, their context, artifacts and the export result (its manifest: ``mq_core.export.manifest``).

An ``Exporter`` turns the canonical QDQ ONNX and its ranges table into a target's artifacts. It declares which
backends it serves and its options (a dataclass, so defaults are documented and unknown options are refused),
writes files through the ``ExportContext`` (into a staging folder that is moved into place only when everything
succeeded), and says how each artifact is run for verification (``runnables``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError, ExportError
from mq_core.export.manifest import MANIFEST, check_self_contained, inside, read_manifest, unsafe_path
from mq_core.export.onnx_graph import save_model
from mq_core.export.ranges import QuantTable, TensorQuant, strip_qdq
from mq_core.io import atomic_write_text
from mq_core.quant.qconfig import QConfig

#: What the ``name`` exporter option (the artifacts' file name stem) may be: one plain file name, no path.
FILE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_STEM_RULE = ("1 to 64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit (a plain "
                  "file name: no folders, no spaces)")


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
    #: the prepared model's ``QConfig`` (what the ranges were calibrated with); None for a hand-built context
    qconfig: QConfig | None = field(default=None, kw_only=True)
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
        if unsafe_path(filename) or filename == MANIFEST:
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
            path = inside(out, entry["path"], f"the file {entry['path']!r} listed in {out / MANIFEST}")
            if not path.is_file():
                raise ConfigError(f"artifact {path} listed in the manifest is missing.")
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                raise ConfigError(f"artifact {path} was modified after export (checksum mismatch).")
            if path.suffix == ".onnx":
                check_self_contained(path)
            artifacts.append(Artifact(entry["kind"], path, entry.get("description", "")))
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
