"""Running ``mq`` in-process on a user's own module, and checking that a bad input is reported as the CLI
promises: exit status 2 and one ``Error:`` paragraph, never a traceback."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mq_core.cli.main import cli


def user_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: dict[str, str]) -> Path:
    """``tmp_path`` as the current directory holding the given user modules (name -> source), none imported yet."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_clean_error(result: Result, *fragments: str) -> str:
    """Exit status 2, no traceback, and the message (after any progress bar of earlier stages) one line starting
    with ``Error:`` that contains every fragment; returns the message."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    message = result.output[result.output.find("Error: "):].strip()
    assert message.startswith("Error: ") and message.count("\n") == 0, result.output
    for fragment in fragments:
        assert fragment in message, message
    return message
