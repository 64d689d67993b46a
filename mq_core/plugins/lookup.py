"""Public lookups over the registries: ``get_backend("trt")``, ``list_observers()``, ...

An unknown name raises ``UnknownNameError`` listing what is installed; for names that a first-party plugin
provides it also says which package to install (or that the package is installed but failed to load).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mq_core.errors import UnknownNameError
from mq_core.plugins.manager import get_manager
from mq_core.plugins.registry import Entry, normalize

if TYPE_CHECKING:
    from mq_core.backend import Backend
    from mq_core.quant.qconfig import QConfigPreset

#: Which first-party distribution provides a name (data only: the core never imports a plugin by name).
FIRST_PARTY: dict[str, dict[str, str]] = {
    "backend": {
        "tensorrt": "mq-trt", "trt": "mq-trt",
        "snpe": "mq-snpe", "qnn": "mq-snpe",
        "tvm": "mq-tvm",
        "openvino": "mq-openvino", "ov": "mq-openvino",
        "tengine": "mq-tengine",
    },
    "fake_quantizer": {n: "mq-algos" for n in ("lsq", "lsq_plus", "dsq", "pact", "dorefa", "apot")},
    "observer": {n: "mq-algos" for n in ("lsq", "lsq_plus")},
    "ptq_method": {n: "mq-algos" for n in ("adaround", "brecq", "qdrop")},
    "qconfig": {n: "mq-algos" for n in ("w4a4-lsq", "w4a4-pact", "w2a4-qdrop")},
    "runtime": {"openvino": "mq-openvino[verify]", "tvm": "mq-tvm[verify]", "onnxruntime": "mq-core[verify]"},
}


def get_entry(kind: str, name: str) -> Entry:
    """The registry entry (object plus provenance) for ``name`` in registry ``kind``."""
    manager = get_manager()
    registry = manager.registries[kind]
    entry = registry.find(name)
    if entry is not None:
        return entry
    label = registry.label
    installed = ", ".join(registry.names()) or "none"
    package = FIRST_PARTY.get(kind, {}).get(normalize(name))
    if package:
        record = manager.record_for(package.split("[")[0])
        if record is not None and record.status == "failed":
            raise UnknownNameError(
                f"{label} {name!r} comes from {record.distribution} {record.version}, which is installed but "
                f"failed to load: {record.error}. Run `mq plugins` for details; reinstall it with "
                f"`pip install --force-reinstall {package}`."
            )
        if record is not None and record.status == "disabled":
            raise UnknownNameError(
                f"{label} {name!r} comes from {record.distribution}, which is installed but not loaded "
                f"({record.error}); add it to MQ_PLUGINS or unset MQ_PLUGINS / MQ_DISABLE_PLUGINS."
            )
        raise UnknownNameError(
            f"{label} {name!r} is not installed: pip install {package}  (installed {label}s: {installed})"
        )
    raise UnknownNameError(
        f"unknown {label} {name!r}. Installed {label}s: {installed}. Check the spelling, or install the plugin "
        "that provides it (`mq plugins` lists what is loaded)."
    )


def _get(kind: str, name: Any) -> Any:
    if not isinstance(name, str):
        return name  # already an object (a Backend instance, an observer class, ...)
    return get_entry(kind, name).obj


def _list(kind: str) -> list[str]:
    return get_manager().registries[kind].names()


def get_backend(name: str | Backend) -> Backend:
    """A deployment target by name or alias, case-insensitive: ``get_backend("TRT")``."""
    return _get("backend", name)


def get_qconfig(name: str | QConfigPreset) -> QConfigPreset:
    return _get("qconfig", name)


def get_observer(name: str | type) -> type:
    return _get("observer", name)


def get_fake_quantizer(name: str | type) -> type:
    return _get("fake_quantizer", name)


def get_exporter(name: str | Any) -> Any:
    return _get("exporter", name)


def get_runtime(name: str | Any) -> Any:
    return _get("runtime", name)


def get_ptq_method(name: str | Any) -> Any:
    return _get("ptq_method", name)


def list_backends() -> list[str]:
    return _list("backend")


def list_qconfigs() -> list[str]:
    return _list("qconfig")


def list_observers() -> list[str]:
    return _list("observer")


def list_fake_quantizers() -> list[str]:
    return _list("fake_quantizer")


def list_exporters() -> list[str]:
    return _list("exporter")


def list_runtimes() -> list[str]:
    return _list("runtime")


def list_ptq_methods() -> list[str]:
    return _list("ptq_method")


def fusion_patterns() -> list[Any]:
    """All registered fusion patterns, longest first (so Conv+BN+ReLU wins over Conv+BN)."""
    return sorted(_resolved("fusion_pattern"), key=lambda p: -len(p.sequence))


def qat_module_mapping() -> dict[type, type]:
    """Float module type -> QAT module type, from every plugin."""
    return dict(_resolved("qat_module"))


def _resolved(kind: str) -> list[Any]:
    """Every object of a registry, one per name, conflicts resolved (or raised) as for a lookup."""
    registry = get_manager().registries[kind]
    return [registry.find(name).obj for name in registry.names()]
