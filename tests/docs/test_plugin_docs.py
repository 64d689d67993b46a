"""docs/plugins.md names what a plugin author builds on (issue 15, item 6): every constant of
``mq_core.plugin_api`` and every part of the observer contract of ``mq_core.quant.observers.base.Observer``."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

import mq_core.plugin_api as api
from mq_core.quant.observers.base import Observer

PLUGINS_MD = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def section(text: str, heading: str) -> str:
    """The text of the ``## heading`` section (up to the next ``## ``)."""
    return re.split(r"^## ", text.split(f"## {heading}\n", 1)[1], flags=re.M)[0]


def unnamed(names: list[str], text: str) -> list[str]:
    """The names that appear in no code span of ``text`` (```INT8_SYM```, ```self.ch_axis```)."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return [n for n in names if not any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", span) for span in spans)]


def test_every_plugin_api_constant_is_listed() -> None:
    constants = [name for name in api.__all__ if name.isupper()]
    assert "INT8_SYM" in constants and unnamed(constants, PLUGINS_MD.read_text()) == []


def test_the_observer_contract_is_described() -> None:
    contract = sorted(name for name in vars(Observer) if not name.startswith("_") and not hasattr(nn.Module, name))
    assert {"observe", "compute_range", "calculate_qparams", "reset", "merge_rules"} <= set(contract)
    assert unnamed(contract, section(PLUGINS_MD.read_text(), "An observer")) == []


def test_the_check_can_fail() -> None:
    assert unnamed(["INT8_SYM", "UINT8_SYM", "ch_axis"], "`INT8_SYM` and `self.ch_axis`, UINT8_SYM") == ["UINT8_SYM"]
    assert section("## A\none\n## B\ntwo\n", "A") == "one\n"
