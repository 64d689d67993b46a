"""Nothing lost (issue 10, points 6-8) and clear errors for a bad --out (point 12).

A kill can stop mq between any two system calls. The tests record the output folder before and after every
``rename``/``replace``/``fsync`` of a write (the only calls that change what is on disk at the destination), which
is exactly what a ``kill -9`` at that moment would leave: each recorded state must be the complete old output or
the complete new one. A real killed process shows that its leftovers are cleaned by the next write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
import mq_core.io
from mq_core.cli.main import cli
from mq_core.export.manifest import is_export_folder
from mq_core.io import staged_directory
from mq_core.pipeline.workflow import quantize_for_backend
from mq_core.testing.zoo import ZOO

MODEL_REF = "mq_core.testing.zoo:MLPBN"
Snapshot = dict[str, str] | None


def snapshot(folder: Path) -> Snapshot:
    """Every file under ``folder`` with its checksum; None when there is no folder."""
    if not folder.is_dir():
        return None
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def watch(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[Snapshot]:
    """Record ``folder`` before and after each rename, replace and fsync from now on (each one a kill point)."""
    states: list[Snapshot] = []

    def hooked(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            states.append(snapshot(folder))
            try:
                return real(*args, **kwargs)
            finally:
                states.append(snapshot(folder))
        return call

    for name in ("rename", "replace", "fsync"):
        monkeypatch.setattr(os, name, hooked(getattr(os, name)))
    return states


def exchange_supported(folder: Path) -> bool:
    """Whether this file system swaps two folders in one step (renameat2 RENAME_EXCHANGE)."""
    a, b = folder / ".probe-a", folder / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return mq_core.io._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture(params=["exchange", "two-renames"])
def swap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> bool:
    """Both ways of swapping a folder in; returns whether the destination may briefly be absent."""
    if request.param == "two-renames":  # what systems without renameat2 (and some file systems) do
        monkeypatch.setattr(mq_core.io, "_renameat2", None)
        return True
    return not exchange_supported(tmp_path)


@pytest.fixture(scope="module")
def qmodel() -> torch.nn.Module:
    entry = ZOO["mlp_bn"]
    model = mq.prepare(entry.build(), "qdq", entry.inputs(2))
    mq.calibrate(model, entry.calibration_data(), progress=False)
    return model


def export(qmodel: torch.nn.Module, out: Path, **options: Any) -> mq.ExportResult:
    return mq.export(qmodel, ZOO["mlp_bn"].inputs(2), out, **options)


@pytest.fixture(scope="module")
def old_export(qmodel: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export with artifacts named ``old``: tests copy it and write over the copy."""
    return export(qmodel, tmp_path_factory.mktemp("old") / "out", name="old").out_dir


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p != path)


# Point 6: all-or-nothing overwrite, no stale files, leftovers cleaned.

def test_overwriting_an_export_swaps_the_whole_folder(qmodel, old_export: Path, tmp_path: Path, monkeypatch,
                                                      swap: bool) -> None:
    out = tmp_path / "out"
    shutil.copytree(old_export, out)
    before = snapshot(out)
    states = watch(monkeypatch, out)
    export(qmodel, out, name="new")
    after = snapshot(out)
    assert sorted(after) == ["manifest.json", "new.onnx"]  # old.onnx is gone with the old manifest
    allowed = [before, after, *([None] if swap else [])]
    assert len(states) > 4 and all(state in allowed for state in states)
    assert states[0] == before and states[-1] == after
    assert siblings(out) == []  # no staging or old folder left beside it
    assert mq.ExportResult.load(out).artifacts[0].path == out / "new.onnx"


def test_a_failing_write_leaves_the_folder_as_it_was(old_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(old_export, out)
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="exporter broke"), \
            staged_directory(out, owned=is_export_folder, what="an mq export folder") as stage:
        (stage / "model.onnx").write_bytes(b"half of a new model")
        raise RuntimeError("exporter broke")
    assert snapshot(out) == before and siblings(out) == []


def test_a_folder_that_is_not_an_mq_output_is_not_replaced(qmodel, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(mq.ExportError, match="already exists and is not an mq export folder"):
        export(qmodel, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(mq.ExportError, match="is a file, not a folder"):
        export(qmodel, notes)
    (tmp_path / "tensorrt").mkdir()  # `mq quantize --out .` beside a user's own folder named like a backend
    (tmp_path / "tensorrt" / "train.py").write_text("mine")
    with pytest.raises(mq.ExportError, match="is not a backend folder of `mq quantize`"):
        quantize_for_backend(ZOO["mlp_bn"].build(), "tensorrt", ZOO["mlp_bn"].calibration_data(), tmp_path)
    assert [p.name for p in (tmp_path / "tensorrt").iterdir()] == ["train.py"]


CRASH = """
import os, sys
from pathlib import Path
import mq_core.io as io

io._renameat2 = None  # the two-rename swap: a kill can fall between moving the old folder aside and the new in
out = Path(sys.argv[1])
real_rename = os.rename

def rename(src, dst):
    real_rename(src, dst)
    if Path(dst).name.startswith(f".{out.name}.mq-old-"):
        os._exit(9)  # killed right after the previous result was moved aside

os.rename = rename
with io.staged_directory(out, owned=lambda path: True) as stage:
    (stage / "second.txt").write_text("second")
"""


def test_leftovers_of_a_killed_write_are_cleaned_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_directory(out) as stage:
        (stage / "first.txt").write_text("first")
    killed = subprocess.run([sys.executable, "-c", CRASH, str(out)], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    # Killed inside the two-rename window: no folder at all (never a mixed one); the previous result is aside.
    assert not out.exists()
    old, stage_left = (sorted(tmp_path.glob(".out.mq-old-*")), sorted(tmp_path.glob(".out.mq-stage-*")))
    assert [snapshot(p) for p in old] == [snapshot_of("first.txt", "first")]
    assert [snapshot(p) for p in stage_left] == [snapshot_of("second.txt", "second")]
    # Folders of a live process, of another machine, or not ours at all are kept.
    host_pid = old[0].name.split("-")[2:4]
    alive = tmp_path / old[0].name.replace("-".join(host_pid), f"{host_pid[0]}-{os.getpid()}")
    other_host = tmp_path / old[0].name.replace(host_pid[0], "0" * 8 if host_pid[0] != "0" * 8 else "1" * 8)
    foreign = tmp_path / ".out.backup"
    for folder in (alive, other_host, foreign):
        folder.mkdir()
    with staged_directory(out, owned=lambda path: True) as stage:
        (stage / "third.txt").write_text("third")
    assert snapshot(out) == snapshot_of("third.txt", "third")
    assert siblings(out) == sorted(p.name for p in (alive, other_host, foreign))


def snapshot_of(name: str, text: str) -> Snapshot:
    return {name: hashlib.sha256(text.encode()).hexdigest()}


# Point 7: a failing export never deletes what another process finished.

def test_a_failing_write_keeps_the_folder_another_process_finished(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="exporter broke"), staged_directory(out) as stage:
        (stage / "ours.txt").write_text("half")
        with staged_directory(out) as other:  # meanwhile another writer finishes its result at the same place
            (other / "theirs.txt").write_text("complete")
        raise RuntimeError("exporter broke")
    assert snapshot(out) == snapshot_of("theirs.txt", "complete") and siblings(out) == []


# Point 8: `mq quantize` writes its checkpoint and exports as one unit.

@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backend folder of a completed earlier `mq quantize` run (TensorRT: two exporters)."""
    out = tmp_path_factory.mktemp("first")
    quantize_for_backend(ZOO["mlp_bn"].build(), "tensorrt", ZOO["mlp_bn"].calibration_data(), out, progress=False)
    return out / "tensorrt"


def test_a_kill_never_leaves_a_checkpoint_beside_exports_of_another(first_run: Path, tmp_path: Path, monkeypatch,
                                                                    swap: bool) -> None:
    folder = tmp_path / "tensorrt"
    shutil.copytree(first_run, folder)
    (folder / "export").mkdir()  # `mq export qmodel.pt` writes here by default: an export of the old checkpoint
    shutil.copytree(first_run / "tensorrt", folder / "export", dirs_exist_ok=True)
    before = snapshot(folder)
    states = watch(monkeypatch, folder)
    calib = [3 * batch for batch in ZOO["mlp_bn"].calibration_data()]  # other ranges: another checkpoint
    outcome = quantize_for_backend(ZOO["mlp_bn"].build(), "tensorrt", calib, tmp_path, progress=False)
    monkeypatch.undo()
    after = snapshot(folder)
    assert outcome.passed and outcome.checkpoint == folder / "qmodel.pt"
    assert after["qmodel.pt"] != before["qmodel.pt"] and "export/manifest.json" not in after
    assert sorted(after) == sorted(k for k in before if not k.startswith("export/"))
    allowed = [before, after, *([None] if swap else [])]
    assert len(states) > 10 and all(state in allowed for state in states)
    assert siblings(folder) == []
    for name, result in outcome.results.items():  # the results point at the final folder, which loads back
        assert result.out_dir == folder / name and mq.ExportResult.load(folder / name).manifest == result.manifest


# Point 12: --out read-only, under a file, on a full disk: one paragraph, exit 2, and nothing half-written.

@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 16, generator=torch.Generator().manual_seed(1)), path)
    return path


def quantize(calib: Path, out: Path) -> Any:
    return CliRunner().invoke(cli, ["quantize", "--model", MODEL_REF, "--calib", str(calib), "--backend",
                                    "tensorrt", "--out", str(out), "--quiet"])


def assert_clean_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output


def test_out_under_a_file(calib_file: Path, tmp_path: Path) -> None:
    assert_clean_error(quantize(calib_file, calib_file / "out"), f"cannot write {calib_file / 'out'}",
                       "a part of the path is a file, not a folder", "choose another output folder (--out")


def test_out_on_a_full_disk_keeps_the_previous_output(first_run: Path, calib_file: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_run, out / "tensorrt")
    before = snapshot(out)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert_clean_error(quantize(calib_file, out), "the disk is full", "Nothing was written there")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["tensorrt"]


#: Runs the rest of its command line as a process that file permissions apply to: as root, it first gives up the
#: capabilities that let root write anywhere (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a 0o555 folder is
#: read-only to it as to everybody else; exit status 77 where even that is not allowed.
UNPRIVILEGED = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP = 24
    if any(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 for cap in (1, 2)):
        sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_out_read_only(calib_file: Path, tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    out = read_only / "out"
    try:
        result = subprocess.run(
            [sys.executable, "-c", UNPRIVILEGED, "-m", "mq_core", "quantize", "--model", MODEL_REF, "--calib",
             str(calib_file), "--backend", "tensorrt", "--out", str(out), "--quiet"],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        read_only.chmod(0o755)
    if result.returncode == 77:
        pytest.skip("running as root without the right to give up its capabilities (CAP_SETPCAP)")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"Error: cannot write {out}: you may not write there"), result.stderr
    assert list(read_only.iterdir()) == []
