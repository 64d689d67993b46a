"""The ``tvm`` runtime: Apache TVM's relax VM on an llvm CPU target runs an exported ONNX to verify it.

Steps (TVM 0.27 has no Relay): ``lower_qoperators`` (QLinearConv/QLinearMatMul, which the relax importer lacks),
``tvm.relax.frontend.onnx.from_onnx`` with the feeds' concrete shapes (relax compiles static shapes),
``relax.transform.DecomposeOpsForInference``, ``tvm.compile(target="llvm")``, ``relax.VirtualMachine`` on
``tvm.cpu()``. Compiling takes seconds per model, so compiled VMs are kept per process and (model bytes, input
shapes and dtypes, target): verifying the same artifact again reuses them. mq runs a runtime in one long-lived worker
process (``mq_core.runtimes.isolation``), so the cache lasts as long as the mq process.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import onnx

from mq_core.plugin_api import Runtime
from mq_tvm.lowering import lower_qoperators

log = logging.getLogger(__name__)

CacheKey = tuple[str, tuple[tuple[str, tuple[int, ...], str], ...], str]


class TVMRuntime(Runtime):
    name = "tvm"
    description = "Apache TVM relax VM, llvm CPU target (QLinearConv/QLinearMatMul lowered first)."
    module = "tvm"
    install = "pip install 'mq-tvm[verify]'"
    domains = frozenset({"", "ai.onnx"})
    #: what ``tvm.compile`` targets; a string or a JSON-style dict, e.g. {"kind": "llvm", "mcpu": "skylake"}.
    target: ClassVar[str | dict[str, Any]] = "llvm"
    #: compiled VMs kept per process (least recently used dropped first).
    cache_size: ClassVar[int] = 16
    _cache: ClassVar[OrderedDict[CacheKey, Any]] = OrderedDict()

    def compile(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Any:
        """The relax VirtualMachine for ``model`` at the feeds' shapes (compiled once per process)."""
        data = model.SerializeToString(deterministic=True)
        key: CacheKey = (hashlib.sha256(data).hexdigest(),
                         tuple((n, tuple(a.shape), str(a.dtype)) for n, a in sorted(feeds.items())), str(self.target))
        vm = self._cache.get(key)
        if vm is None:
            vm = self._build(model, feeds)
            self._cache[key] = vm
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return vm

    def _build(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Any:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        start = time.perf_counter()
        mod = from_onnx(lower_qoperators(model), shape_dict={n: list(a.shape) for n, a in feeds.items()},
                        dtype_dict={n: str(a.dtype) for n, a in feeds.items()})
        mod = relax.transform.DecomposeOpsForInference()(mod)
        executable = tvm.compile(mod, target=tvm.target.Target(self.target))
        vm = relax.VirtualMachine(executable, tvm.cpu())
        log.info("compiled %s for TVM (%s) in %.1f s", model.graph.name or "model", self.target,
                 time.perf_counter() - start)
        return vm

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        vm = self.compile(model, feeds)
        to_device = getattr(tvm.runtime, "tensor", None) or tvm.nd.array  # older TVM: tvm.nd.array
        names = [i.name for i in model.graph.input if i.name in feeds]
        result = vm["main"](*(to_device(np.ascontiguousarray(feeds[n])) for n in names))
        outputs = [result] if hasattr(result, "numpy") else list(result)
        return [o.numpy() for o in outputs]
