"""A checkpoint must not name code that mq then runs (issue 10, point 1).

A checkpoint from elsewhere may record any ``model_ref`` (``"os:abort"``, ``"code:interact"``) and any
``"module:attr"`` entry in ``skip`` / ``leaf_modules``. ``mq inspect/export/verify`` call the recorded factory only
when the user confirms it (``--model``, ``--trust-model-ref``) or it is mq's own demo factory, import a module named
by the file only with ``--trust-model-ref`` (``trust=True`` in Python), and ``mq inspect`` shows an untrusted file
from its data alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.cli.quantize import DEMO_MODEL_REF
from mq_core.demo.digits import DigitsCNN

#: A user's model module, and a module whose import leaves a mark (as any code a file could make mq import would).
USER_MODULE = "mq_trust_usernet"
MARKING_MODULE = "mq_trust_marking"
MODULES = {
    USER_MODULE: """
        from mq_core.demo.digits import DigitsCNN

        def build():
            return DigitsCNN()
    """,
    MARKING_MODULE: """
        from pathlib import Path
        from torch import nn

        Path(__file__).with_name("imported.txt").write_text("this module's code ran")

        class Marker(nn.Module):
            pass
    """,
}


def _craft(source: Path, target: Path, *, model_ref: str, skip: list[str] | None = None) -> Path:
    """A copy of a checkpoint with another recorded factory / skip list, as an attacker would write it."""
    payload = torch.load(source, weights_only=True)
    payload["model_ref"] = model_ref
    if skip is not None:
        payload["info"]["skip"] = skip
    torch.save(payload, target)
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated digits CNN saved as the demo does, crafted copies, and a user's module folder."""
    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    qmodel = mq.prepare(DigitsCNN().eval(), "qdq", (x,))
    mq.calibrate(qmodel, [x], progress=False)
    demo = mq.save_checkpoint(qmodel, root / "demo.pt", x, model_ref=DEMO_MODEL_REF)
    (root / "export").mkdir()  # `mq verify` rebuilds the checkpoint's model before it reads the export folder
    _craft(demo, root / "abort.pt", model_ref="os:abort")
    _craft(demo, root / "interact.pt", model_ref="code:interact", skip=["os:abort"])
    _craft(demo, root / "mq-main.pt", model_ref="mq_core.cli.main:main")  # mq's own code, but no factory
    _craft(demo, root / "user.pt", model_ref=f"{USER_MODULE}:build", skip=[f"{MARKING_MODULE}:Marker"])
    for name, text in MODULES.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def in_files(files: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The files' folder as the current directory, its modules not imported yet and no mark left."""
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(files))
    (files / "imported.txt").unlink(missing_ok=True)
    for name in MODULES:
        sys.modules.pop(name, None)
    yield files
    for name in MODULES:
        sys.modules.pop(name, None)


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _assert_clean_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("Error: ") and message.count("\n") == 0, result.output
    for fragment in fragments:
        assert fragment in message, message


#: Runs the CLI on the crafted files in a fresh process; ``code.interact`` ends that process with status 99 if
#: anything calls it, and ``os.abort`` kills it. The last command trusts the file, so it must end with 99.
SCRIPT = """
import code, json, os, sys
from click.testing import CliRunner
from mq_core.cli.main import cli

code.interact = lambda *args, **kwargs: os._exit(99)
results = {}
for name in ("abort.pt", "interact.pt"):
    for command in (["inspect", name], ["export", name, "--out", "out"], ["verify", "export", "--checkpoint", name]):
        result = CliRunner().invoke(cli, command)
        results[" ".join(command)] = [result.exit_code, result.output]
print(json.dumps(results), flush=True)
CliRunner().invoke(cli, ["export", "interact.pt", "--out", "out", "--trust-model-ref"])
"""


def test_recorded_factories_are_never_called_without_confirmation(files: Path) -> None:
    process = subprocess.run([sys.executable, "-c", SCRIPT], cwd=files, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
    assert process.returncode == 99, process.stderr  # survived both files, then trusting one did call it
    results = json.loads(process.stdout.splitlines()[0])
    for command, (code, output) in results.items():
        ref = "os:abort" if "abort.pt" in command else "code:interact"
        assert "Traceback" not in output and ref in output, (command, output)
        if command.startswith("inspect"):
            assert code == 0, output
            assert "The model was not rebuilt" in output and "--trust-model-ref" in output
        else:
            assert code == 2, output
            assert output.startswith("Error: ") and "--trust-model-ref" in output and "--model" in output
    assert not (files / "out").exists()


def test_inspect_shows_an_untrusted_file_without_rebuilding(files: Path) -> None:
    result = _invoke("inspect", str(files / "interact.pt"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "checkpoint for 'qdq' with qconfig 'qdq-default' (ptq); 4 weight and 6 activation " \
                       "quantizers, 10 calibrated"
    settings = dict(line.split(None, 1) for line in lines[3:7])
    assert settings["inputs"] == "float32[4, 1, 8, 8]" and settings["model_ref"] == "code:interact"
    assert "os:abort" in result.output  # the skip entry is shown, not resolved
    # the quantizers' stored qparams, read from the state dict
    trusted = mq.restore(DigitsCNN(), mq.load_checkpoint(files / "demo.pt"))
    fc = trusted.get_submodule("fc.weight_fake_quant")
    row = next(line for line in lines if line.startswith("fc.weight_fake_quant "))
    assert row.split()[1:3] == ["weight", f"s=[{fc.scale.min():.3g}..{fc.scale.max():.3g}]"]
    assert "The model was not rebuilt" in lines[-1] and "'code:interact'" in lines[-1]


def test_only_listed_mq_factories_are_trusted_by_default(files: Path) -> None:
    demo = _invoke("inspect", str(files / "demo.pt"))
    assert demo.exit_code == 0, demo.output
    assert demo.output.startswith("prepared for 'qdq'") and "MinMaxObserver" in demo.output  # rebuilt
    _assert_clean_error(_invoke("export", str(files / "mq-main.pt"), "--out", str(files / "x")),
                        "'mq_core.cli.main:main'", "--trust-model-ref")


def test_a_user_factory_needs_model_or_trust_and_a_named_module_needs_trust(in_files: Path) -> None:
    mark = in_files / "imported.txt"
    _assert_clean_error(_invoke("export", "user.pt", "--out", "a"), f"'{USER_MODULE}:build'", "--trust-model-ref")
    # --model confirms the factory, not the module the skip entry names: importing it would run its code
    _assert_clean_error(_invoke("export", "user.pt", "--out", "a", "--model", f"{USER_MODULE}:build"),
                        f"'{MARKING_MODULE}:Marker'", f"module '{MARKING_MODULE}'", "--trust-model-ref")
    assert not mark.exists() and MARKING_MODULE not in sys.modules
    # an import-free look: the skip entry is shown as text
    inspected = _invoke("inspect", "user.pt")
    assert inspected.exit_code == 0 and f"{MARKING_MODULE}:Marker" in inspected.output and not mark.exists()
    trusted = _invoke("inspect", "user.pt", "--trust-model-ref")
    assert trusted.exit_code == 0, trusted.output
    assert trusted.output.startswith("prepared for 'qdq'")  # the full summary of the rebuilt model
    assert mark.exists()  # the user trusted the file: the module was imported


def test_python_restore_imports_only_with_trust(in_files: Path) -> None:
    checkpoint = mq.load_checkpoint("user.pt")
    with pytest.raises(mq.ConfigError, match=f"module '{MARKING_MODULE}', which is not imported") as info:
        mq.restore(DigitsCNN(), checkpoint)
    assert "trust=True" in str(info.value) and not (in_files / "imported.txt").exists()
    restored = mq.restore(DigitsCNN(), checkpoint, trust=True)
    assert (in_files / "imported.txt").exists() and len(mq.quantizers(restored)) == 10
    # a module that is imported already is used as it is, without trust (nothing new runs)
    (in_files / "imported.txt").unlink()
    assert len(mq.quantizers(mq.restore(DigitsCNN(), checkpoint))) == 10
    assert not (in_files / "imported.txt").exists()


def test_a_reference_must_name_the_kind_of_object_its_use_needs(files: Path) -> None:
    checkpoint = mq.load_checkpoint(files / "demo.pt")
    checkpoint["info"]["leaf_modules"] = ["os:system"]  # imported and found, but no module type
    with pytest.raises(mq.ConfigError, match="'os:system' is a builtin_function_or_method, not a module type"):
        mq.restore(DigitsCNN(), checkpoint)
