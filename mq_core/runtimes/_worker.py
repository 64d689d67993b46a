"""The child side of ``mq_core.runtimes.isolation``: a process that runs one runtime's ``run`` calls for mq.

It is started as ``python -c "runpy.run_path(<this file>)"``, not imported through the ``mq_core`` package, and
imports only what the runtime needs: ``mq_core``'s package ``__init__`` files (which import torch for the public
API) are not run here, so a runtime module such as ``mq_core.runtimes.onnxruntime`` loads with numpy, onnx and its
runtime alone. A runtime whose module needs them (``from mq_core import Runtime``) is loaded again the ordinary
way.

Protocol (pickle streams; the parent is mq, the only writer): stdin carries ``(sys.path, pickled runtime)`` once,
then ``(serialized model or None, feeds)`` per call, where ``None`` means "the same model as last time";
the original stdout carries ``("ready", None)``, then ``("ok", outputs)`` or ``("error", message)`` per call. File
descriptor 1 is pointed at stderr so that whatever the runtime's native code prints cannot corrupt the replies.
End of stdin ends the process. ``faulthandler`` writes the Python stack of a native crash to stderr, where the
parent reads where the runtime died.
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import importlib.machinery
import os
import pickle
import sys
from types import ModuleType
from typing import Any, BinaryIO

_CORE = "mq_core"


class _SkipCoreInits(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``mq_core``'s packages as bare namespaces (``__path__`` only, ``__init__`` not run); its modules load
    as usual through the finders after this one."""

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _CORE and not fullname.startswith(_CORE + "."):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.submodule_search_locations is not None:
                    spec.loader = self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        """Nothing: the package's ``__init__`` stays unrun."""


def _load_runtime(data: bytes) -> Any:
    """The runtime object, importing its module without ``mq_core``'s package ``__init__`` files if it can."""
    finder = _SkipCoreInits()
    sys.meta_path.insert(0, finder)
    try:
        return pickle.loads(data)
    except Exception:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == _CORE or n.startswith(_CORE + ".")]:
            del sys.modules[name]
        return pickle.loads(data)


def _send(replies: BinaryIO, message: tuple[str, Any]) -> None:
    pickle.dump(message, replies, protocol=pickle.HIGHEST_PROTOCOL)
    replies.flush()


def serve() -> None:
    """Answer run requests until the parent closes stdin."""
    import numpy as np
    import onnx

    faulthandler.enable()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    path, runtime_data = pickle.load(requests)
    sys.path[:] = path
    try:
        runtime = _load_runtime(runtime_data)
    except Exception as exc:
        _send(replies, ("error", f"{type(exc).__name__}: {exc}"))
        return
    _send(replies, ("ready", None))
    model = None
    while True:
        try:
            data, feeds = pickle.load(requests)
        except EOFError:
            return
        if data is not None:
            model = onnx.ModelProto.FromString(data)
        try:
            outputs = [np.asarray(o) for o in runtime.run(model, feeds)]
        except Exception as exc:
            _send(replies, ("error", f"{type(exc).__name__}: {exc}"))
            continue
        _send(replies, ("ok", outputs))


if __name__ == "__main__":
    serve()
