"""Issue 10, point 3: names registered by plugins match one documented pattern; any other name fails the plugin.

The hostile names come from a really installed distribution (``tests/fixtures/dists/example_badnames``) with one
entry point per name; each registers a valid name first, which must be withdrawn with the bad one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mq_core as mq
from mq_core.builtin import QDQ_BACKEND
from mq_core.errors import PluginLoadError
from mq_core.plugins import Entry, MQPluginWarning, get_manager
from mq_core.plugins.registry import NAME_PATTERN, NAME_RULE

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"

#: entry point of mq-example-badnames -> (registry kind, the name it registers that must be refused)
BAD = {
    "empty": ("observer", ""),
    "traversal": ("backend", "../../evil"),
    "slash": ("observer", "evil/x"),
    "dotfile": ("observer", ".hidden"),
    "reserved": ("backend", "all"),
    "reserved_case": ("observer", "ALL"),
    "trailing_space": ("backend", "QDQ "),
    "leading_space": ("observer", " minmax"),
    "inner_space": ("observer", "min max"),
    "newline": ("observer", "minmax\n"),
    "fullwidth": ("observer", "\uff51\uff44\uff51"),
    "too_long": ("observer", "x" * 129),
    "not_a_string": ("observer", 5),
    "bad_alias": ("backend", "../up"),
}


@pytest.fixture
def badnames(plugin_env) -> dict[str, object]:
    """Load mq-example-badnames; the records by entry-point name."""
    with pytest.warns(MQPluginWarning) as caught:
        plugin_env(MQ_PLUGINS="mq-example-badnames")
        records = {r.entry_point.split(" = ")[0]: r for r in get_manager().records[1:]}
    assert len([w for w in caught if issubclass(w.category, MQPluginWarning)]) == len(BAD)
    return records


@pytest.mark.parametrize("entry_point", sorted(BAD))
def test_a_name_outside_the_rule_fails_the_plugin_and_registers_nothing(badnames, entry_point: str) -> None:
    kind, name = BAD[entry_point]
    record = badnames[entry_point]
    assert record.status == "failed"
    assert record.registered == {}
    assert f"{kind} name {name!r} is not allowed" in record.error and NAME_RULE in record.error
    registry = get_manager().registries[kind]
    tag = entry_point.replace("_", "-")
    assert f"badnames-{tag}" not in registry.names()  # the valid name registered before it was withdrawn too
    assert registry.find(f"badnames-{tag}") is None


def test_bad_names_leave_the_core_and_its_default_backend_alone(badnames) -> None:
    assert mq.list_backends() == ["qdq"]
    assert mq.get_backend("qdq") is QDQ_BACKEND and mq.get_backend(" QDQ ") is QDQ_BACKEND
    assert "minmax" in mq.list_observers() and mq.get_entry("observer", "minmax").distribution == "mq-core"
    with pytest.raises(mq.UnknownNameError):
        mq.get_backend("../../evil")
    assert get_manager().registries["backend"].conflicts() == {}


@pytest.mark.parametrize("name", ["qdq", "TensorRT", "openvino-qdq", "w4a4-dorefa-pact", "lsq_plus", "8bit",
                                  "torch.nn.modules.conv.Conv2d", "x" * 128, "all-layers", "allx"])
def test_the_names_in_use_match_the_rule(name: str) -> None:
    Entry("backend", name, object())


@pytest.mark.parametrize("name", ["", "all", "All", "a b", "../x", "x/y", "-x", "_x", "\tx", "x\n", "é"])
def test_entries_outside_the_rule_are_refused_also_through_the_python_api(name: str) -> None:
    with pytest.raises(PluginLoadError, match="is not allowed"):
        Entry("exporter", name, object())
    with pytest.raises(PluginLoadError, match="exporter name"):
        Entry("exporter", "ok", object(), aliases=(name,))


def test_the_rule_is_documented_with_the_pattern_the_code_uses() -> None:
    text = DOCS.read_text()
    assert NAME_PATTERN.pattern in text and "`all` is reserved" in text
