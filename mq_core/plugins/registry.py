"""Typed registries: name -> object, with aliases, case-insensitive lookup and provenance.

Conflicts are resolved lazily: every claim on a name is kept, and a lookup of a name claimed by two
distributions either picks the one ``MQ_PREFER`` lists first or raises ``PluginConflictError`` naming both. So one
conflicting third-party package never breaks the names it does not touch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mq_core.errors import PluginConflictError


def normalize(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class Entry:
    """One registered item and where it came from."""

    kind: str
    name: str
    obj: Any
    aliases: tuple[str, ...] = ()
    description: str = ""
    distribution: str = "mq-core"
    version: str = ""

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
        return self.kind.replace("_", " ").replace("ptq", "PTQ")

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
        if len(claims) <= 1:
            return claims[0] if claims else None
        for dist in self.prefer():
            for entry in claims:
                if canonical_distribution(entry.distribution) == canonical_distribution(dist):
                    return entry
        names = " and ".join(f"{e.distribution} {e.version}".strip() for e in claims)
        first = claims[0].distribution
        raise PluginConflictError(
            f"{self.label} {normalize(name)!r} is registered by both {names}. Choose one by setting the "
            f"environment variable MQ_PREFER to the distribution that should win (e.g. MQ_PREFER={first}), "
            "or uninstall the one you do not want."
        )

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def conflicts(self) -> dict[str, list[Entry]]:
        return {k: v for k, v in self._index.items() if len({e.distribution for e in v}) > 1}

    def names(self) -> list[str]:
        return sorted(dict.fromkeys(e.name for e in self._entries))


def canonical_distribution(name: str) -> str:
    """PEP 503-style distribution name: lower case, runs of - _ . become -."""
    return re.sub(r"[-_.]+", "-", normalize(name))
