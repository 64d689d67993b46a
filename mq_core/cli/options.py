"""Options shared by mq's commands: verbosity (``-v``/``-q`` before or after the sub-command), and completion of
the names plugins register (backends, exporters, presets ...).

Nothing here imports torch: ``mq --help`` and shell completion of commands and options stay fast, and torch is
imported by the first command that needs it. Completing a registered *name* loads the plugins (they define the
names), which does import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem

F = TypeVar("F", bound=Callable[..., Any])

#: ``ctx.find_root().meta`` key holding "verbose" or "quiet" once -v or -q was given (anywhere on the line).
VERBOSITY = "mq.verbosity"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_LEVELS = {"verbose": logging.DEBUG, "quiet": logging.ERROR, None: logging.WARNING}


def apply_verbosity(ctx: click.Context) -> None:
    """Set the log level the -v/-q given so far ask for (debug / errors only / warnings)."""
    logging.getLogger().setLevel(_LEVELS[ctx.find_root().meta.get(VERBOSITY)])


def _record(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    meta = ctx.find_root().meta
    wanted = str(param.name)
    if meta.get(VERBOSITY, wanted) != wanted:
        raise click.UsageError("-v/--verbose and -q/--quiet contradict each other; pass one of them.", ctx)
    meta[VERBOSITY] = wanted
    apply_verbosity(ctx)


def is_quiet(ctx: click.Context) -> bool:
    """Whether -q/--quiet was given before or after the sub-command."""
    return ctx.find_root().meta.get(VERBOSITY) == "quiet"


def verbosity_options(expose_quiet: bool = False) -> Callable[[F], F]:
    """``-v/--verbose`` and ``-q/--quiet``, for the root group and every sub-command, so either works on either side
    of the sub-command. ``expose_quiet`` also passes ``quiet`` to the command (``mq quantize`` reads it from its
    TOML file too)."""

    def decorate(f: F) -> F:
        f = click.option("-q", "--quiet", is_flag=True, expose_value=expose_quiet, callback=_record,
                         help="Errors only: no progress bars, no warnings.")(f)
        return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_record,
                            help="Log debug messages.")(f)

    return decorate


class Names(click.ParamType):
    """A name completed from a plugin registry (``kind``: "backend", "exporter", "qconfig", "observer",
    "ptq_method", "runtime") plus ``extra`` fixed values.

    Conversion keeps the text as it is: the name is checked where it is looked up, whose error lists the installed
    names and says which package provides a missing first-party one (click's own "not one of" could not)."""

    name = "name"

    def __init__(self, kind: str, extra: Sequence[str] = ()) -> None:
        self.kind = kind
        self.extra = tuple(extra)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "NAME"

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        from mq_core.plugins.manager import get_manager

        registry = get_manager().registries[self.kind]
        names = [*self.extra, *registry.names()]
        return [CompletionItem(n) for n in names if n.lower().startswith(incomplete.lower())]


class Choices(click.ParamType):
    """Free text completed from a fixed list (``--device``: cpu, cuda; also cuda:1, checked where it is used)."""

    name = "text"

    def __init__(self, choices: Sequence[str], metavar: str) -> None:
        self.choices = tuple(choices)
        self.metavar = metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(c) for c in self.choices if c.startswith(incomplete)]


class Shape(click.ParamType):
    """A tensor shape, batch first: ``1,3,224,224`` (or ``1x3x224x224``), as a tuple of positive ints."""

    name = "shape"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "N,C,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        parts = str(value).replace("x", ",").replace(" ", "").strip("[]()").split(",")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not a shape; write the sizes separated by commas, batch first, e.g. 1,3,224,224.",
                      param, ctx)
        if any(d < 1 for d in shape):
            self.fail(f"{value!r}: every size must be a positive integer.", param, ctx)
        return shape


DEVICE = Choices(("cpu", "cuda"), "cpu|cuda")
