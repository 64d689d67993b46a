"""Runtimes run in worker processes, so that a runtime that crashes in native code fails a check, not mq.

A runtime is native code fed with a model that mq has just written, and some crash on valid models (OpenVINO
2026.4's ``compile_model`` segfaults on the QDQ ONNX of ``torch.cat([a, a], 1) + 1.0``). ``run(runtime, model,
feeds)`` therefore executes ``runtime.run`` in a child process (``mq_core/runtimes/_worker.py``): a crash there
ends the child, and mq raises ``RuntimeCrashError`` naming the signal and the Python frame it died in, which
``verify`` turns into a failed check. Python exceptions of the runtime come back as ``VerificationError``.

Cost, kept small: one worker per runtime object and mq process, started on first use (``start`` starts it early,
so it loads while mq does other work) and reused by later calls; the child imports numpy, onnx and the runtime
but not torch (about 0.3 s for ONNX Runtime); a call pickles the feeds and outputs through pipes, and the model
only when it differs from the previous call's. A worker that crashed is replaced by a fresh one on the next call.
The runtime object travels by pickle, so its class must be importable by the child (any module-level class is).

``MQ_IN_PROCESS_RUNTIMES=1`` runs runtimes inside the mq process instead: to step into a runtime with a debugger,
or where child processes are not allowed. A native crash then ends mq.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mq_core.errors import VerificationError

log = logging.getLogger(__name__)

#: Environment variable: a true value ("1", "true", "yes", "on") runs runtimes in the mq process.
IN_PROCESS_ENV = "MQ_IN_PROCESS_RUNTIMES"

_WORKER_FILE = Path(__file__).with_name("_worker.py")
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


class RuntimeCrashError(VerificationError):
    """A runtime's process died (segfault, abort, exit) while compiling or running a model."""


def in_process() -> bool:
    """Whether ``MQ_IN_PROCESS_RUNTIMES`` asks for runtimes to run inside the mq process."""
    return os.environ.get(IN_PROCESS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _crash_site(stderr: str) -> str:
    """Where the child died, from what it printed: the runtime's own last message before the crash and the
    innermost Python frame that ``faulthandler`` dumped."""
    head, _, dump = stderr.partition("Fatal Python error")
    said = " ".join(line.strip() for line in head.strip().splitlines()[-3:])
    frame = _FRAME.search(dump.partition("Current thread")[2])
    parts = []
    if frame:
        parts.append(f"in {frame['func']}() at {Path(frame['file']).name}:{frame['line']}")
    if said:
        parts.append(f"its last output: {said[-300:]}")
    return f" ({'; '.join(parts)})" if parts else ""


class _Worker:
    """One child process serving one runtime object, one call at a time."""

    def __init__(self, name: str, runtime: bytes) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(_WORKER_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, start_new_session=True,  # Ctrl-C reaches mq, which then closes its workers
        )
        self.ready = False
        self.model: bytes | None = None
        self._send((list(sys.path), runtime))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _send(self, message: Any) -> None:
        assert self.process.stdin is not None
        pickle.dump(message, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.process.stdin.flush()

    def _receive(self) -> tuple[str, Any]:
        assert self.process.stdout is not None
        return pickle.load(self.process.stdout)

    def call(self, model: bytes, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
        with self.lock:
            self.stderr.seek(0, os.SEEK_END)
            offset = self.stderr.tell()
            try:
                if not self.ready:
                    status, payload = self._receive()
                    if status != "ready":  # the handler below ends the worker
                        raise VerificationError(
                            f"runtime {self.name} could not be loaded in a worker process: {payload[:600]}. Make "
                            f"its module importable on its own, or set {IN_PROCESS_ENV}=1 to run runtimes inside "
                            "mq (a runtime that crashes then ends mq)."
                        )
                    self.ready = True
                self._send((None if model == self.model else model, feeds))
                self.model = model
                status, payload = self._receive()
            except (EOFError, OSError, pickle.UnpicklingError):
                raise self._crashed(what, offset) from None
            except BaseException:  # e.g. Ctrl-C mid-call: the pipes are out of step, so this worker is done
                self.close()
                raise
        if status == "error":
            raise VerificationError(f"{self.name} failed to run {what}: {payload[:600]}")
        return payload

    def _crashed(self, what: str, offset: int) -> RuntimeCrashError:
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the pipe broke but the process lingers: end it
            self.process.kill()
            code = self.process.wait()
        if code < 0:
            try:
                how = f"signal {-code}, {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit status {code}"
        self.stderr.seek(offset)
        site = _crash_site(self.stderr.read().decode(errors="replace"))
        self.close()
        return RuntimeCrashError(
            f"{self.name} crashed ({how}) while compiling or running {what}{site}. The crash is in the runtime's "
            f"native code; mq kept going because runtimes run in a separate process, but {what} is not verified by "
            f"{self.name}. Report the model to the runtime's developers, or rely on the other runtimes' checks."
        )

    def close(self) -> None:
        """End the child (it exits when its stdin closes) and release the pipes."""
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


_WORKERS: dict[bytes, _Worker] = {}
_WORKERS_LOCK = threading.Lock()


def _worker(runtime: Any) -> _Worker:
    """The live worker of ``runtime`` (by its pickled state), started if there is none."""
    try:
        key = pickle.dumps(runtime, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise VerificationError(
            f"runtime {runtime.name} cannot be sent to a worker process ({type(exc).__name__}: {exc}); define its "
            f"class at module level with picklable attributes, or set {IN_PROCESS_ENV}=1 to run runtimes inside mq."
        ) from exc
    with _WORKERS_LOCK:
        worker = _WORKERS.get(key)
        if worker is None or not worker.alive:
            worker = _WORKERS[key] = _Worker(runtime.name, key)
            log.debug("started a worker process for runtime %s (pid %d)", runtime.name, worker.process.pid)
        return worker


def start(runtime: Any) -> None:
    """Start ``runtime``'s worker now, if it has none, so that it loads while the caller does other work. A runtime
    that cannot have a worker is left for ``run`` to report."""
    if not in_process():
        with contextlib.suppress(VerificationError):
            _worker(runtime)


def run(
    runtime: Any, model: onnx.ModelProto, feeds: dict[str, np.ndarray], what: str = "the model"
) -> list[np.ndarray]:
    """``runtime.run(model, feeds)`` in the runtime's worker process (see the module docstring).

    ``what`` names the model in error messages (``"the onnx-qdq artifact"``). Raises ``RuntimeCrashError`` when the
    runtime's process died, ``VerificationError`` when the runtime raised.
    """
    if in_process():
        try:
            return [np.asarray(o) for o in runtime.run(model, feeds)]
        except Exception as exc:
            raise VerificationError(f"{runtime.name} failed to run {what}: {type(exc).__name__}: {exc}"[:800]) from exc
    return _worker(runtime).call(model.SerializeToString(), feeds, what)


@atexit.register
def _close_all() -> None:
    with _WORKERS_LOCK:
        for worker in _WORKERS.values():
            worker.close()
        _WORKERS.clear()
