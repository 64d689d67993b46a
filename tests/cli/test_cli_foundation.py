"""`mq --version`, `mq plugins`, `mq backends`, plugin sub-commands, through click's runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import mq_core
from mq_core.cli.main import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert mq_core.__version__ in result.output


def test_backends_json_lists_every_target_with_schemes_and_package(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["backends", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {b["name"]: b for b in json.loads(result.output)}
    assert set(by_name) >= {"qdq", "tensorrt", "snpe", "tvm", "openvino", "tengine"}
    trt = by_name["tensorrt"]
    assert trt["aliases"] == ["trt"]
    assert trt["weight"] == "int8 sym per-channel(0) narrow"
    assert trt["activation"] == "int8 sym per-tensor"
    assert trt["provided_by"] == "mq-trt"
    assert by_name["snpe"]["weight"] == "uint8 affine per-tensor"
    assert by_name["qdq"]["provided_by"] == "mq-core"


def test_backends_table(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["backends"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["backend", "aliases", "weights"]
    assert any(line.startswith("tensorrt") and "mq-trt 0.1.0" in line for line in lines)


def test_plugins_json_shows_status_and_registrations(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_dist = {p["distribution"]: p for p in data["plugins"]}
    assert by_dist["mq-trt"]["status"] == "loaded"
    assert by_dist["mq-trt"]["registered"]["backend"] == ["tensorrt"]
    assert "minmax" in by_dist["mq-core"]["registered"]["observer"]
    assert data["conflicts"] == []


def test_plugins_shows_failed_plugin_and_conflicts(runner: CliRunner, plugin_env) -> None:
    with pytest.warns(UserWarning):
        plugin_env(MQ_PLUGINS="mq-example-broken,mq-example-conflict,mq-trt")
        result = runner.invoke(cli, ["plugins", "--json"])
    data = json.loads(result.stdout)
    broken = next(p for p in data["plugins"] if p["distribution"] == "mq-example-broken")
    assert broken["status"] == "failed" and "libexample_runtime.so" in broken["error"]
    assert {"kind": "backend", "name": "tensorrt", "distributions": ["mq-example-conflict", "mq-trt"]} in data[
        "conflicts"
    ]
    table = runner.invoke(cli, ["plugins"])
    assert "failed" in table.stdout and "MQ_PREFER" in table.stderr


def test_plugin_adds_a_subcommand(runner: CliRunner, plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-example-backend")
    from mq_core.cli.main import MQGroup

    root = MQGroup(name="mq", commands=dict(cli.commands))  # a fresh root so commands load under this env
    result = runner.invoke(root, ["example-hello"])
    assert result.exit_code == 0, result.output
    assert "hello from mq-example-backend" in result.output
