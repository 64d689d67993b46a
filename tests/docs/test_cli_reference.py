"""docs/cli.md matches ``--help`` (issue 15, item 6): every command of mq has a section, and every option its
``--help`` lists is named in that section; the options every command shares (``-v``/``-q``, ``--help``) are named
at the top of the page."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from mq_core.cli.main import cli

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
#: Options of every command (documented once, at the top of the page).
SHARED = {"-v", "--verbose", "-q", "--quiet", "--help"}


def sections(text: str) -> dict[str, str]:
    """Each ``## `` section's text by every ``mq NAME`` its heading names (one section may cover several)."""
    found: dict[str, str] = {}
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts[1:]:
        heading = part.splitlines()[0]
        for name in re.findall(r"`mq ([a-z][\w-]*)", heading):
            found[name] = part
    return found


def flags(command: click.Command) -> set[str]:
    """Every option spelling ``command --help`` lists (``--report`` and ``--no-report`` both)."""
    ctx = click.Context(command, info_name=command.name)
    return {flag for p in command.get_params(ctx) if isinstance(p, click.Option) and not p.hidden
            for flag in [*p.opts, *p.secondary_opts]}


def missing(command: click.Command, section: str) -> list[str]:
    return sorted(f for f in flags(command) - SHARED if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", section))


def test_top_of_the_page_names_the_shared_options() -> None:
    top = re.split(r"^## ", CLI_MD.read_text(), flags=re.M)[0]
    assert missing(cli, top) == [] and all(f in top for f in ("-v", "--verbose", "-q", "--quiet", "--help"))


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_of_every_command_is_in_its_section(name: str) -> None:
    found = sections(CLI_MD.read_text())
    assert name in found, f"docs/cli.md has no '## `mq {name} ...`' section"
    assert missing(cli.commands[name], found[name]) == []


def test_the_check_can_fail() -> None:
    @click.command("demo")
    @click.option("--shown/--hidden-not", default=True)
    @click.option("--other")
    def demo(shown: bool, other: str | None) -> None: ...

    assert missing(demo, "`--shown` and `--other-thing`") == ["--hidden-not", "--other"]
    assert sections("## `mq a`, `mq b`\ntext\n## `mq c X`\nmore\n") == {"a": "`mq a`, `mq b`\ntext\n",
                                                                       "b": "`mq a`, `mq b`\ntext\n",
                                                                       "c": "`mq c X`\nmore\n"}
