"""Issue 10, point 4: plugins cannot take the host down or hijack it.

Every hostile plugin here is a really installed distribution (``tests/fixtures/dists/example_*``) discovered through
its entry points; the command line is driven through click's runner on a fresh root group, so plugin commands load
under each test's environment.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

import mq_core as mq
from mq_core.builtin import QDQ_BACKEND
from mq_core.cli.main import MQGroup, cli
from mq_core.plugins import MQPluginWarning, PluginRecord, get_manager
from mq_core.plugins.manager import COMMAND_PROVIDER


def _records(dist: str) -> dict[str, PluginRecord]:
    """The records of one distribution, by entry-point name."""
    return {r.entry_point.split(" = ")[0]: r for r in get_manager().records if r.distribution == dist}


def _invoke(*args: str) -> tuple[Result, MQGroup]:
    """Run ``mq *args`` on a fresh root holding only the core's commands."""
    root = MQGroup(name="mq", commands={n: c for n, c in cli.commands.items() if not hasattr(c, COMMAND_PROVIDER)})
    return CliRunner().invoke(root, list(args)), root


def test_sys_exit_at_import_fails_only_that_plugin(plugin_env) -> None:
    with pytest.warns(MQPluginWarning, match=r"mq-example-sysexit 0\.0\.3 \(sysexit = .*sys\.exit\(3\)"):
        plugin_env(MQ_PLUGINS="mq-example-sysexit")
        assert mq.get_backend("qdq") is QDQ_BACKEND
    record = _records("mq-example-sysexit")["sysexit"]
    assert (record.status, record.error) == ("failed", "SystemExit: the plugin called sys.exit(3)")


def test_sys_exit_at_import_does_not_end_the_mq_command(plugin_env) -> None:
    with pytest.warns(MQPluginWarning, match="sys.exit"):
        plugin_env(MQ_PLUGINS="mq-example-sysexit")
        result, _ = _invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    by_entry_point = {p["entry_point"].split(" = ")[0]: p for p in json.loads(result.stdout)["plugins"]}
    assert by_entry_point["sysexit"]["status"] == "failed"


def test_a_command_hook_that_exits_withdraws_the_whole_plugin(plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-example-sysexit")
    with pytest.warns(MQPluginWarning):  # the import-time sys.exit of the other entry point
        assert mq.get_backend("sysexit-target").name == "sysexit-target"  # its registry hook alone worked
    with pytest.warns(MQPluginWarning, match=r"sysexit_command.*command registration.*no licence"):
        result, root = _invoke("sysexit-hello")
    assert result.exit_code == 2 and "No such command 'sysexit-hello'" in result.output
    assert "sysexit-hello" not in root.commands
    record = _records("mq-example-sysexit")["sysexit_command"]
    assert record.status == "failed" and record.registered == {}
    with pytest.raises(mq.UnknownNameError):
        mq.get_backend("sysexit-target")


def test_a_base_exception_subclass_in_a_hook_fails_the_plugin_and_it_registers_nothing(plugin_env) -> None:
    with pytest.warns(MQPluginWarning, match=r"mq-example-baseexc.*PluginAbort: licence server unreachable"):
        plugin_env(MQ_PLUGINS="mq-example-baseexc")
        with pytest.raises(mq.UnknownNameError):
            mq.get_backend("baseexc-target")  # registered by the hook that ran before the failing one
    assert _records("mq-example-baseexc")["baseexc"].status == "failed"
    result, root = _invoke("baseexc-hello")  # its command hook is never run
    assert result.exit_code == 2 and "No such command" in result.output
    assert "baseexc-hello" not in root.commands


def test_ctrl_c_while_plugins_load_interrupts_and_the_next_lookup_loads_afresh(plugin_env, monkeypatch) -> None:
    plugin_env(MQ_PLUGINS="mq-example-interrupt", MQ_EXAMPLE_INTERRUPT="1")
    with pytest.raises(KeyboardInterrupt):
        mq.get_backend("qdq")
    monkeypatch.setenv("MQ_PLUGINS", "mq-example-backend")  # no reset(): the same manager must retry
    assert mq.list_backends() == ["example", "qdq"]
    assert [r.distribution for r in get_manager().records if r.status == "loaded"] == [
        "mq-core", "mq-example-backend"]


def test_a_plugin_claiming_core_names_does_not_break_the_core_default_backend(plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-example-hijack")
    for name in ("qdq", "QDQ", " qdq", "ort", "ORT"):
        assert mq.get_backend(name) is QDQ_BACKEND
    assert mq.get_entry("backend", "qdq").distribution == "mq-core"
    assert mq.list_backends() == ["qdq"]  # `--backend all` runs the core's qdq once, not the shadowed copy too
    conflicts = get_manager().registries["backend"].conflicts()
    assert {k: [e.distribution for e in v] for k, v in conflicts.items()} == {
        "qdq": ["mq-core", "mq-example-hijack"], "ort": ["mq-core", "mq-example-hijack"]}
    # the user, and only the user, can pick the plugin's
    plugin_env(MQ_PLUGINS="mq-example-hijack", MQ_PREFER="mq-example-hijack")
    assert mq.get_backend("qdq").description == "not the core's qdq"


def test_plugin_commands_cannot_replace_rename_or_remove_core_commands(plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-example-hijack")
    with pytest.warns(MQPluginWarning) as caught:
        result, root = _invoke("verify", "--help")
    assert result.exit_code == 0, result.output
    assert "PASS (hijacked)" not in result.output and "Always PASS" not in result.output
    assert root.commands["verify"] is cli.commands["verify"]
    assert "Quantize" not in root.commands and root.commands["export"] is cli.commands["export"]
    messages = " | ".join(str(w.message) for w in caught)
    assert "command 'verify' would replace a core command ('verify')" in messages
    assert "command 'Quantize' would replace a core command ('quantize')" in messages
    assert "removed the command 'export'" in messages
    records = _records("mq-example-hijack")
    assert {ep: r.status for ep, r in records.items()} == {
        "hijack": "failed", "hijack_case": "failed", "hijack_remove": "failed"}
    # a refused plugin registers nothing at all: its backend claim on the core's names is withdrawn too
    assert get_manager().registries["backend"].conflicts() == {}
