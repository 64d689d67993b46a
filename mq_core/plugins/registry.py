"""Typed registries: name -> object, with aliases, case-insensitive lookup and provenance.

Every name and alias matches one pattern (``NAME_RULE``): names end up in command lines, file and folder names
and messages, so ``""``, ``"../../evil"``, ``"all"`` (``--backend all``) or names with spaces are refused.

Conflicts are resolved lazily: every claim on a name is kept, and a lookup of a name claimed by two
distributions either picks the one ``MQ_PREFER`` lists first, or the core's own entry when the core is one of
them, or raises ``PluginConflictError`` naming both. So one conflicting third-party package never breaks the names
it does not touch, and never the core's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mq_core.errors import PluginConflictError, PluginLoadError

#: The distribution of the core's built-ins; its entries win over a plugin's claim on the same name.
CORE_DISTRIBUTION = "mq-core"

#: Every registry name and alias, compared case-insensitively: a letter or digit, then letters, digits, ``.``,
#: ``_`` or ``-``; at most 128 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Names with a meaning of their own on the command line (``--backend all``, ``runtimes="all"``).
RESERVED_NAMES = frozenset({"all"})
NAME_RULE = (
    "a name starts with a letter or digit and continues with letters, digits, '.', '_' or '-' (at most 128 "
    "characters, no spaces; case does not matter), and 'all' is reserved"
)


def normalize(name: str) -> str:
    """The lookup key of a name: what users type is matched case-insensitively, surrounding spaces ignored."""
    return name.strip().lower()


def check_name(label: str, name: object) -> None:
    """Refuse a name outside ``NAME_PATTERN`` or reserved, with the rule in the message (``PluginLoadError``)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.lower() in RESERVED_NAMES:
        raise PluginLoadError(
            f"{label} name {name!r} is not allowed: {NAME_RULE}. Rename it in the plugin that registers it."
        )


@dataclass(frozen=True)
class Entry:
    """One registered item and where it came from."""

    kind: str
    name: str
    obj: Any
    aliases: tuple[str, ...] = ()
    description: str = ""
    distribution: str = CORE_DISTRIBUTION
    version: str = ""

    def __post_init__(self) -> None:
        for name in (self.name, *self.aliases):
            check_name(_label(self.kind), name)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(normalize(k) for k in (self.name, *self.aliases)))

    @property
    def provider(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass
class Registry:
    """All claims of one kind (``backend``, ``observer``, ...)."""

    kind: str
    prefer: Callable[[], Sequence[str]] = field(default=lambda: ())
    _entries: list[Entry] = field(default_factory=list)
    _index: dict[str, list[Entry]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The kind as users read it in messages ("ptq_method" -> "PTQ method")."""
        return _label(self.kind)

    def add(self, entry: Entry) -> None:
        """Record a claim. The same key twice from one distribution is that plugin's bug: ValueError."""
        for key in entry.keys:
            for other in self._index.get(key, ()):
                if other.distribution == entry.distribution:
                    raise ValueError(
                        f"{entry.distribution} registers {self.label} {key!r} twice "
                        f"({other.name!r} and {entry.name!r})"
                    )
        self._entries.append(entry)
        for key in entry.keys:
            self._index.setdefault(key, []).append(entry)

    def discard(self, entry: Entry) -> None:
        """Withdraw a claim (used to roll back a plugin whose registration failed half-way)."""
        self._entries = [e for e in self._entries if e is not entry]
        for key in entry.keys:
            self._index[key] = [e for e in self._index.get(key, []) if e is not entry]

    def find(self, name: str) -> Entry | None:
        """The entry for ``name`` (or alias), ``None`` if unknown; raises on an unresolved conflict."""
        claims = self._index.get(normalize(name), [])
        winner = self._winner(claims)
        if winner is not None or not claims:
            return winner
        names = " and ".join(f"{e.distribution} {e.version}".strip() for e in claims)
        first = claims[0].distribution
        raise PluginConflictError(
            f"{self.label} {normalize(name)!r} is registered by both {names}. Choose one by setting the "
            f"environment variable MQ_PREFER to the distribution that should win (e.g. MQ_PREFER={first}), "
            "or uninstall the one you do not want."
        )

    def _winner(self, claims: Sequence[Entry]) -> Entry | None:
        """Who owns a name: the only claim, else the first ``MQ_PREFER`` distribution, else the core; else None."""
        if len(claims) <= 1:
            return claims[0] if claims else None
        for dist in self.prefer():
            for entry in claims:
                if canonical_distribution(entry.distribution) == canonical_distribution(dist):
                    return entry
        return next((e for e in claims if e.distribution == CORE_DISTRIBUTION), None)

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def conflicts(self) -> dict[str, list[Entry]]:
        return {k: v for k, v in self._index.items() if len({e.distribution for e in v}) > 1}

    def names(self) -> list[str]:
        """One name per reachable entry (``--backend all`` iterates these).

        A name whose lookup lands on another entry (a plugin's ``"QDQ"`` or ``"ort"`` beside the core's ``qdq``)
        is left out, so nothing is listed, or run, twice; a name in an unresolved conflict stays listed, and
        looking it up reports the conflict.
        """
        listed: dict[str, str] = {}
        for entry in self._entries:
            key = normalize(entry.name)
            if key in listed:
                continue
            winner = self._winner(self._index[key])
            if winner is None or normalize(winner.name) == key:
                listed[key] = entry.name if winner is None else winner.name
        return sorted(listed.values())


def _label(kind: str) -> str:
    return kind.replace("_", " ").replace("ptq", "PTQ")


def canonical_distribution(name: str) -> str:
    """PEP 503-style distribution name: lower case, runs of - _ . become -."""
    return re.sub(r"[-_.]+", "-", normalize(name))
