"""Plugin loading: the core's built-ins, then every entry point in group ``mq``, once, on first registry use.

Rules (documented in docs/plugins.md):

* A plugin whose import or hook raises is skipped with one ``MQPluginWarning`` naming its distribution and the
  error; nothing it registered is kept; everything else works; ``mq plugins`` shows it as failed.
* ``MQ_PLUGINS=dist-a,dist-b`` loads only those distributions (plus the core); ``MQ_DISABLE_PLUGINS=1`` loads the
  core's built-ins only; ``MQ_PREFER=dist-a,...`` picks the winner when distributions claim the same name.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import importlib_metadata
import pluggy

from mq_core import hookspecs
from mq_core.hookspecs import REGISTRY_HOOKS
from mq_core.plugins.registry import Entry, Registry, canonical_distribution

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mq"
CORE_DISTRIBUTION = "mq-core"


class MQPluginWarning(UserWarning):
    """A plugin failed to load or to register and was skipped."""


@dataclass
class PluginRecord:
    """What ``mq plugins`` shows about one plugin module."""

    distribution: str
    version: str
    entry_point: str
    status: str = "loaded"  # loaded | failed | disabled
    error: str = ""
    registered: dict[str, list[str]] = field(default_factory=dict)


def _env_list(var: str) -> list[str]:
    return [canonical_distribution(v) for v in os.environ.get(var, "").split(",") if v.strip()]


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}


def core_version() -> str:
    try:
        return importlib_metadata.version(CORE_DISTRIBUTION)
    except importlib_metadata.PackageNotFoundError:
        from mq_core import __version__

        return __version__


class PluginManager:
    """Owns the pluggy manager, the registries and the per-plugin records."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self._pm: pluggy.PluginManager | None = None
        self._modules: list[tuple[ModuleType, PluginRecord]] = []
        self.records: list[PluginRecord] = []
        self.registries: dict[str, Registry] = {
            kind: Registry(kind, prefer=lambda: _env_list("MQ_PREFER")) for kind in REGISTRY_HOOKS.values()
        }

    # --- loading --------------------------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self._load()

    def _load(self) -> None:
        pm = pluggy.PluginManager("mq")
        pm.add_hookspecs(hookspecs)
        self._pm = pm
        from mq_core import builtin

        core = PluginRecord(CORE_DISTRIBUTION, core_version(), "mq_core.builtin")
        pm.register(builtin, name=CORE_DISTRIBUTION)
        self._modules.append((builtin, core))
        self.records.append(core)
        if not _env_flag("MQ_DISABLE_PLUGINS"):
            self._load_entry_points(pm)
        for module, record in self._modules:
            self._run_registry_hooks(pm, module, record)
        for registry in self.registries.values():
            for key, claims in registry.conflicts().items():
                log.warning(
                    "%s %r is registered by %s; set MQ_PREFER to choose",
                    registry.label, key, " and ".join(e.distribution for e in claims),
                )

    def _load_entry_points(self, pm: pluggy.PluginManager) -> None:
        only = set(_env_list("MQ_PLUGINS"))
        eps = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: (canonical_distribution(e.dist.name if e.dist else ""), e.name)):
            dist = ep.dist.name if ep.dist else "<unknown distribution>"
            version = ep.dist.version if ep.dist else ""
            record = PluginRecord(dist, version, f"{ep.name} = {ep.value}")
            self.records.append(record)
            if only and canonical_distribution(dist) not in only:
                record.status, record.error = "disabled", "not listed in MQ_PLUGINS"
                continue
            try:
                module = ep.load()
                pm.register(module, name=f"{dist}:{ep.name}")
            except Exception as exc:  # a broken plugin must not break the others
                self._fail(record, "import", exc)
                continue
            self._modules.append((module, record))

    def _run_registry_hooks(self, pm: pluggy.PluginManager, module: ModuleType, record: PluginRecord) -> None:
        staged: list[tuple[str, Entry]] = []
        try:
            for hook_name, kind in REGISTRY_HOOKS.items():
                for impl in getattr(pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is module:
                        register = _make_register(kind, record, staged)
                        impl.function(**{arg: register for arg in impl.argnames})
            for kind, entry in staged:
                self.registries[kind].add(entry)
        except Exception as exc:
            for kind, entry in staged:
                self.registries[kind].discard(entry)
            self._fail(record, "registration", exc)
            return
        for kind, entry in staged:
            record.registered.setdefault(kind, []).append(entry.name)

    def _fail(self, record: PluginRecord, stage: str, exc: BaseException) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.registered.clear()
        warnings.warn(
            f"mq: plugin {record.distribution} {record.version} ({record.entry_point}) failed during {stage} and "
            f"was skipped: {record.error}",
            MQPluginWarning,
            stacklevel=4,
        )

    # --- commands -------------------------------------------------------------------------------------------
    def add_commands(self, cli: Any) -> None:
        """Let every loaded plugin add sub-commands to the root click group."""
        self.ensure_loaded()
        assert self._pm is not None
        for impl in self._pm.hook.register_commands.get_hookimpls():
            record = next((r for m, r in self._modules if m is impl.plugin), None)
            try:
                impl.function(cli=cli)
            except Exception as exc:
                if record is not None:
                    self._fail(record, "command registration", exc)

    def record_for(self, distribution: str) -> PluginRecord | None:
        self.ensure_loaded()
        wanted = canonical_distribution(distribution)
        return next((r for r in self.records if canonical_distribution(r.distribution) == wanted), None)


def _make_register(kind: str, record: PluginRecord, staged: list[tuple[str, Entry]]) -> Callable[..., None]:
    """The ``register`` callable handed to one plugin's hook for one registry kind."""

    def register(obj: Any, name: str | None = None, aliases: Any = None, description: str | None = None) -> None:
        entry = _make_entry(kind, obj, name, aliases, description, record)
        for other_kind, other in staged:
            if other_kind == kind and set(other.keys) & set(entry.keys):
                raise ValueError(f"{record.distribution} registers {kind.replace('_', ' ')} {entry.name!r} twice")
        staged.append((kind, entry))

    if kind == "qat_module":

        def register_qat(float_type: type, qat_type: type) -> None:
            register((float_type, qat_type), name=f"{float_type.__module__}.{float_type.__qualname__}")

        return register_qat
    return register


def _make_entry(
    kind: str, obj: Any, name: str | None, aliases: Any, description: str | None, record: PluginRecord
) -> Entry:
    name = name or getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind.replace('_', ' ')} was registered without a name: {obj!r}")
    if aliases is None:
        aliases = getattr(obj, "aliases", ())
    if description is None:
        description = getattr(obj, "description", None) or ((getattr(obj, "__doc__", None) or "").strip().split(
            "\n")[0] if isinstance(obj, type) else "")
    return Entry(kind, name, obj, tuple(aliases), description or "", record.distribution, record.version)


_manager = PluginManager()


def get_manager() -> PluginManager:
    """The process-wide plugin manager (loaded on first use)."""
    _manager.ensure_loaded()
    return _manager


def reset() -> None:
    """Forget everything loaded so the next lookup re-reads entry points and environment variables.

    For tests and for long-running processes that install plugins at run time.
    """
    global _manager
    _manager = PluginManager()
