"""The example scripts run as a user runs them (``python examples/<script>.py``) and report a verified deployment.

A session fixture trains the digits model once into a cache private to this session (``MQ_CACHE_DIR``, never the
user's cache), then starts every script run at once, each a subprocess with one torch thread: most of a run is
fixed cost (imports, the ONNX export), so running them side by side keeps the module well under a minute and a
half even on a loaded two-core machine. Each test then waits for its own run and checks its summary.

Verification uses ONNX Runtime only (``--runtime onnxruntime``): it is the quickest, and OpenVINO and TVM are
exercised on every backend by the backend tests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import mq_core as mq
from mq_core.demo.digits import pretrained

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: Plugin-selection variables of the calling shell must not change which backends the scripts see.
PLUGIN_ENV = ("MQ_PLUGINS", "MQ_DISABLE_PLUGINS", "MQ_PREFER")
TIMEOUT_S = 600

#: run name -> (script, its arguments besides --quiet --threads 1 --runtime onnxruntime --out)
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ptq-qdq": ("ptq_digits.py", ("--backend", "qdq")),
    "ptq-tensorrt": ("ptq_digits.py", ("--backend", "tensorrt")),
    "qat-lsq": ("qat_digits.py", ("--epochs", "2", "--freeze-bn-epoch", "1")),
}


def _missing(name: str) -> str | None:
    """Why run ``name`` cannot happen in this environment (a plugin is not installed), or None."""
    if name == "ptq-tensorrt" and "tensorrt" not in mq.list_backends():
        return "backend 'tensorrt' (mq-trt) is not installed"
    if name == "qat-lsq" and "w4a4-lsq" not in mq.list_qconfigs():
        return "the w4a4-lsq preset comes from mq-algos, which is not installed"
    return None


@dataclass
class Run:
    """One script run in a subprocess; ``wait()`` returns (exit status, stdout, stderr)."""

    process: subprocess.Popen
    folder: Path

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def wait(self) -> tuple[int, str, str]:
        code = self.process.wait(timeout=TIMEOUT_S)
        return code, (self.folder / "stdout.txt").read_text(), (self.folder / "stderr.txt").read_text()


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    env.update(MQ_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the trained digits CNN, trained here once (one thread, as in the scripts)."""
    cache = tmp_path_factory.mktemp("mq-cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MQ_CACHE_DIR", str(cache))
        torch.set_num_threads(1)
        try:
            pretrained("cnn")
        finally:
            torch.set_num_threads(threads)
    assert list(cache.glob("digits-cnn-*.pt"))
    return cache


@pytest.fixture(scope="session")
def runs(digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every runnable entry of ``RUNS``, started side by side (stdout/stderr go to files: no pipe can fill up)."""
    started: dict[str, Run] = {}
    try:
        for name, (script, args) in RUNS.items():
            if _missing(name):
                continue
            folder = tmp_path_factory.mktemp(name)
            command = [sys.executable, str(EXAMPLES / script), "--quiet", "--threads", "1", "--runtime",
                       "onnxruntime", "--out", str(folder / "out"), *args]
            with open(folder / "stdout.txt", "w") as stdout, open(folder / "stderr.txt", "w") as stderr:
                process = subprocess.Popen(command, env=_env(digits_cache), cwd=folder, stdout=stdout,
                                           stderr=stderr, text=True)
            started[name] = Run(process, folder)
        yield started
    finally:
        for run in started.values():  # a failed or interrupted session leaves no script running
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()


def finished(runs: dict[str, Run], name: str) -> tuple[str, Path]:
    """Wait for run ``name``; its stdout (after asserting a zero exit status) and its output folder."""
    reason = _missing(name)
    if reason:
        pytest.skip(reason)
    code, stdout, stderr = runs[name].wait()
    assert code == 0, f"exit status {code}\n{stdout}\n{stderr}"
    return stdout, runs[name].out


def summary(stdout: str) -> dict[str, str]:
    """The script's ``key: value`` summary lines (the first of each key)."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key and not key.startswith(" "):
            found.setdefault(key, value.strip())
    return found


def percent(text: str) -> float:
    match = re.match(r"([\d.]+)%", text)
    assert match, f"no percentage in {text!r}"
    return float(match.group(1))


def check_deployment(stdout: str, out: Path) -> dict[str, str]:
    """A passing verification, accuracies a trained digits model reaches, and the artifacts on disk."""
    lines = summary(stdout)
    assert lines["verification"].startswith("PASS"), stdout
    assert "runtimes onnxruntime" in lines["verification"], stdout
    assert percent(lines["float accuracy"]) > 95.0, stdout
    simulated, deployed = percent(lines["simulated accuracy"]), percent(lines["deployed accuracy"])
    assert simulated > 90.0 and deployed > 90.0, stdout
    # the artifact was verified to agree with the simulation, so both classify (almost) every image alike
    assert abs(simulated - deployed) <= 0.5, stdout
    artifacts = [Path(line.split()[-1]) for line in stdout.splitlines() if line.startswith("artifact: ")]
    assert artifacts and all(p.is_file() and out in p.parents for p in artifacts), stdout
    assert all((p.parent / "manifest.json").is_file() for p in artifacts)
    return lines


@pytest.mark.parametrize("backend", ["qdq", "tensorrt"])
def test_ptq_digits_exports_a_verified_model(runs: dict[str, Run], backend: str) -> None:
    stdout, out = finished(runs, f"ptq-{backend}")
    lines = check_deployment(stdout, out)
    assert f"backend {backend!r}" in stdout
    assert lines["qconfig"].startswith(f"{mq.get_backend(backend).qconfig.name} ")
    assert Path(lines["checkpoint"]).is_file()


def test_qat_digits_trains_exports_and_verifies(runs: dict[str, Run]) -> None:
    stdout, out = finished(runs, "qat-lsq")
    lines = check_deployment(stdout, out)
    assert lines["qconfig"].startswith("w4a4-lsq ") and "int4" in lines["qconfig"]
    assert lines["training"] == "2 epoch(s), BatchNorm frozen after epoch 1"
    # training recovers what 4-bit LSQ initialisation loses
    assert percent(lines["simulated accuracy"]) >= percent(lines["calibrated accuracy"]), stdout


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"mq_example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["ptq_digits", "qat_digits", "qat_ddp"])
def test_bad_options_fail_before_any_work(script: str, tmp_path: Path) -> None:
    """An unknown backend is refused by the first line of ``main`` (the script maps MQError to exit status 2)."""
    main = _load_script(script).main
    with pytest.raises(mq.UnknownNameError, match="unknown backend 'no-such-target'"):
        main(["--backend", "no-such-target", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_qat_refuses_a_backend_that_cannot_run_4_bits(tmp_path: Path) -> None:
    if _missing("ptq-tensorrt") or _missing("qat-lsq"):
        pytest.skip("needs mq-trt and mq-algos")
    with pytest.raises(mq.SchemeError, match="cannot run W4A4"):
        _load_script("qat_digits").main(["--backend", "tensorrt", "--out", str(tmp_path / "out")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_qat_ddp_trains_under_torchrun_and_resumes_in_one_process(digits_cache: Path, tmp_path: Path) -> None:
    """Epoch 1 on 2 gloo ranks (torchrun), then a plain process resumes from rank 0's checkpoint for epoch 2: the
    optimizer state and the learning-rate schedule continue (Adam's step counts add up) and both runs export a
    verified model."""
    if _missing("qat-lsq"):
        pytest.skip(_missing("qat-lsq"))
    steps = 3
    common = ["--max-steps", str(steps), "--out", str(tmp_path / "out"), "--runtime", "onnxruntime", "--threads", "1",
              "--verify-samples", "16", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), str(EXAMPLES / "qat_ddp.py"), "--epochs", "1"]
    resume = [sys.executable, str(EXAMPLES / "qat_ddp.py"), "--epochs", "2", "--resume",
              str(tmp_path / "out" / "checkpoint.pt")]
    checkpoints = []
    for command in (torchrun + common, resume + common):
        done = subprocess.run(command, env=_env(digits_cache), cwd=tmp_path, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        lines = summary(done.stdout)
        assert lines["verification"].startswith("PASS"), done.stdout
        assert percent(lines["simulated accuracy"]) > 80.0, done.stdout
        checkpoints.append((lines, mq.load_checkpoint(tmp_path / "out" / "checkpoint.pt")))
    (first, trained), (second, resumed) = checkpoints
    assert first["processes"].startswith("2 (gloo") and second["processes"].startswith("1 (")
    assert second["training"] == "epochs 2-2 (resumed after epoch 1)"
    assert [c["extra"]["epoch"] for c in (trained, resumed)] == [1, 2]
    # the cosine learning rate of epoch 1 of 1, then of epoch 2 of 2: the schedule follows the resumed epoch
    assert [c["extra"]["optimizer"]["param_groups"][0]["lr"] for c in (trained, resumed)] == [5e-4, 2.5e-4]
    adam_steps = [{int(s["step"]) for s in c["extra"]["optimizer"]["state"].values()} for c in (trained, resumed)]
    assert adam_steps == [{steps}, {2 * steps}]
