"""Plugin loading: the core's built-ins, then every entry point in group ``mq``, once, on first registry use.

Rules (documented in docs/plugins.md):

* A plugin whose import or hook raises is skipped with one ``MQPluginWarning`` naming its distribution and the
  error; nothing it registered is kept, commands included; everything else works; ``mq plugins`` shows it as
  failed. That covers ``sys.exit`` and any other ``BaseException`` from plugin code, except ``KeyboardInterrupt``:
  a real Ctrl-C while plugins load still stops mq (and the next lookup loads again from scratch).
* A registration outside the name rule (``registry.NAME_RULE``), or a command that would replace or remove a
  command the core or another plugin already provides, fails the plugin the same way.
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
from mq_core.errors import PluginLoadError
from mq_core.hookspecs import REGISTRY_HOOKS
from mq_core.plugins.registry import (
    CORE_DISTRIBUTION,
    NAME_RULE,
    Entry,
    Registry,
    canonical_distribution,
    check_name,
    normalize,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mq"
#: The core's own plugin (its backends, exporters, observers ...), loaded like any plugin: an entry point, by name.
#: The manager never imports it directly, so the plugin machinery does not depend on what it loads. It is not
#: declared in pyproject's entry points because a checkout must work without being installed.
CORE_ENTRY_POINT = importlib_metadata.EntryPoint(name="core", value="mq_core.builtin", group=ENTRY_POINT_GROUP)
#: Attribute set on a plugin's click command: the distribution that added it (core commands have none).
COMMAND_PROVIDER = "mq_distribution"


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
        from mq_core._version import __version__

        return __version__


class PluginManager:
    """Owns the pluggy manager, the registries and the per-plugin records."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self._clear()

    def _clear(self) -> None:
        self._pm: pluggy.PluginManager | None = None
        self._modules: list[tuple[ModuleType, PluginRecord]] = []
        self._claims: dict[int, list[tuple[str, Entry]]] = {}  # id(record) -> what it registered
        self.records: list[PluginRecord] = []
        self.registries: dict[str, Registry] = {
            kind: Registry(kind, prefer=lambda: _env_list("MQ_PREFER")) for kind in REGISTRY_HOOKS.values()
        }

    # --- loading --------------------------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        with self._lock:
            if not self._loaded:
                self._loaded = True  # set first: a plugin hook that looks a name up must not start a second load
                try:
                    self._load()
                except BaseException:  # a Ctrl-C (plugin errors never get here): leave nothing half-loaded
                    self._clear()
                    self._loaded = False
                    raise

    def _load(self) -> None:
        pm = pluggy.PluginManager("mq")
        pm.add_hookspecs(hookspecs)
        self._pm = pm
        builtin = CORE_ENTRY_POINT.load()  # always loaded, never isolated: mq does not work without it
        core = PluginRecord(CORE_DISTRIBUTION, core_version(), CORE_ENTRY_POINT.value)
        pm.register(builtin, name=CORE_DISTRIBUTION)
        self._modules.append((builtin, core))
        self.records.append(core)
        if not _env_flag("MQ_DISABLE_PLUGINS"):
            self._load_entry_points(pm)
        for module, record in self._modules:
            self._run_registry_hooks(pm, module, record)
        for registry in self.registries.values():
            for key, claims in registry.conflicts().items():
                owner = "mq-core's is used unless MQ_PREFER names another" if any(
                    e.distribution == CORE_DISTRIBUTION for e in claims) else "set MQ_PREFER to choose"
                log.warning(
                    "%s %r is registered by %s; %s",
                    registry.label, key, " and ".join(e.distribution for e in claims), owner,
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
            self._import(pm, ep, record)

    def _import(self, pm: pluggy.PluginManager, ep: Any, record: PluginRecord) -> None:
        def load() -> None:
            module = ep.load()
            pm.register(module, name=f"{record.distribution}:{ep.name}")
            self._modules.append((module, record))

        self._isolated(record, "import", load)

    def _run_registry_hooks(self, pm: pluggy.PluginManager, module: ModuleType, record: PluginRecord) -> None:
        staged: list[tuple[str, Entry]] = []
        self._claims[id(record)] = staged  # withdrawn as a whole if anything below fails

        def run() -> None:
            for hook_name, kind in REGISTRY_HOOKS.items():
                for impl in getattr(pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is module:
                        register = _make_register(kind, record, staged)
                        impl.function(**{arg: register for arg in impl.argnames})
            for kind, entry in staged:
                self.registries[kind].add(entry)

        if self._isolated(record, "registration", run):
            for kind, entry in staged:
                record.registered.setdefault(kind, []).append(entry.name)

    def _isolated(self, record: PluginRecord, stage: str, call: Callable[[], None]) -> bool:
        """Run plugin code; whatever it raises fails that plugin, not mq. True when it succeeded.

        ``SystemExit`` and other ``BaseException`` subclasses are a plugin's failure like any error. Only
        ``KeyboardInterrupt`` passes through: a real Ctrl-C while plugins load must still stop mq, and a plugin
        raising it itself cannot be told apart from one.
        """
        try:
            call()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._fail(record, stage, exc)
            return False
        return True

    def _fail(self, record: PluginRecord, stage: str, exc: BaseException) -> None:
        for kind, entry in self._claims.pop(id(record), []):
            self.registries[kind].discard(entry)
        record.status = "failed"
        record.error = _describe(exc)
        record.registered.clear()
        warnings.warn(
            f"mq: plugin {record.distribution} {record.version} ({record.entry_point}) failed during {stage} and "
            f"was skipped: {record.error}",
            MQPluginWarning,
            stacklevel=5,
        )

    # --- commands -------------------------------------------------------------------------------------------
    def add_commands(self, cli: Any) -> None:
        """Let every loaded plugin add sub-commands to the root click group ``cli``.

        The commands ``cli`` holds before (the core's) cannot be replaced or removed, nor can one plugin replace
        another's: such a plugin fails like one whose hook raised, and ``cli`` is left as it was before its hook
        ran. Names follow the registries' rule and are compared the same way (case-insensitively).
        """
        self.ensure_loaded()
        assert self._pm is not None
        owners = {normalize(n): CORE_DISTRIBUTION for n, c in cli.commands.items()
                  if getattr(c, COMMAND_PROVIDER, None) is None}  # a plugin command of an earlier load may go
        for impl in self._pm.hook.register_commands.get_hookimpls():
            record = next((r for m, r in self._modules if m is impl.plugin), None)
            if record is not None and record.status == "loaded":  # a failed plugin adds nothing, commands included
                self._add_plugin_commands(cli, impl, record, owners)

    def _add_plugin_commands(self, cli: Any, impl: Any, record: PluginRecord, owners: dict[str, str]) -> None:
        """Run one plugin's ``register_commands``; on any failure put ``cli`` back as it was before."""
        before = dict(cli.commands)
        added: dict[str, Any] = {}

        def run() -> None:
            impl.function(cli=cli)
            added.update({n: c for n, c in cli.commands.items() if before.get(n) is not c})
            _check_commands(before, cli.commands, added, owners)

        if not self._isolated(record, "command registration", run):
            cli.commands.clear()
            cli.commands.update(before)
            return
        for name, command in added.items():
            setattr(command, COMMAND_PROVIDER, record.distribution)
            owners[normalize(name)] = record.distribution
            record.registered.setdefault("command", []).append(name)

    def record_for(self, distribution: str) -> PluginRecord | None:
        self.ensure_loaded()
        wanted = canonical_distribution(distribution)
        return next((r for r in self.records if canonical_distribution(r.distribution) == wanted), None)


def _check_commands(before: dict[str, Any], after: dict[str, Any], added: dict[str, Any],
                    owners: dict[str, str]) -> None:
    """Refuse (``PluginLoadError``) a hook that removed a command, or added one with a bad or taken name."""
    for name in before:
        if name not in after:
            raise PluginLoadError(f"the plugin removed the command {name!r}; plugins may only add commands")
    for name in added:
        check_name("command", name)
        owner = owners.get(normalize(name))
        if owner is not None:
            whose = "a core command" if owner == CORE_DISTRIBUTION else f"a command of {owner}"
            raise PluginLoadError(
                f"command {name!r} would replace {whose} ({normalize(name)!r}); plugins may not replace commands, "
                "rename it in the plugin"
            )


def _describe(exc: BaseException) -> str:
    """The one-line reason ``mq plugins`` shows for a failed plugin."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _make_register(kind: str, record: PluginRecord, staged: list[tuple[str, Entry]]) -> Callable[..., None]:
    """The ``register`` callable handed to one plugin's hook for one registry kind."""

    def register(obj: Any, name: str | None = None, aliases: Any = None, description: str | None = None) -> None:
        entry = _make_entry(kind, obj, name, aliases, description, record)
        for other_kind, other in staged:
            if other_kind == kind and set(other.keys) & set(entry.keys):
                raise PluginLoadError(
                    f"{record.distribution} registers {kind.replace('_', ' ')} {entry.name!r} twice"
                )
        staged.append((kind, entry))

    if kind == "qat_module":

        def register_qat(float_type: type, qat_type: type) -> None:
            register((float_type, qat_type), name=f"{float_type.__module__}.{float_type.__qualname__}")

        return register_qat
    return register


def _make_entry(
    kind: str, obj: Any, name: str | None, aliases: Any, description: str | None, record: PluginRecord
) -> Entry:
    if name is None:
        name = getattr(obj, "name", None)
    if name is None:
        raise PluginLoadError(f"a {kind.replace('_', ' ')} was registered without a name: {obj!r} ({NAME_RULE})")
    if aliases is None:
        aliases = getattr(obj, "aliases", ())
    if isinstance(aliases, str):
        aliases = (aliases,)  # one alias given as a string, not a string of one-letter aliases
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
