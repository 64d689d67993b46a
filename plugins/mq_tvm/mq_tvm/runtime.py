"""The ``tvm`` runtime: Apache TVM's relax VM on an llvm CPU target runs an exported ONNX to verify it.

Steps (TVM 0.27 has no Relay): ``lower_qoperators`` (QLinearConv/QLinearMatMul, which the relax importer lacks),
``static_shapes`` (the inputs fixed to the feeds' shapes and every integer value computed from shapes alone folded
into an initializer: relax compiles static shapes, and its importer cannot reshape a tensor whose shape comes from a
``Shape -> Gather -> Slice`` chain, which a model exported with a dynamic sequence length has),
``tvm.relax.frontend.onnx.from_onnx`` with the feeds' concrete shapes,
``relax.transform.DecomposeOpsForInference``, ``tvm.compile(target="llvm")``, ``relax.VirtualMachine`` on
``tvm.cpu()``. Compiling takes seconds per model, so compiled VMs are kept per process and (model bytes, input
shapes and dtypes, target): verifying the same artifact again reuses them. mq runs a runtime in one long-lived worker
process (``mq_core.runtimes.isolation``), so the cache lasts as long as the mq process.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

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
        mod = from_onnx(static_shapes(lower_qoperators(model), feeds),
                        shape_dict={n: list(a.shape) for n, a in feeds.items()},
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


#: Largest value ``static_shapes`` folds into an initializer (a shape, a range of positions, a causal mask).
FOLD_MAX_ELEMENTS = 1 << 20


def static_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with its graph inputs fixed to the feeds' shapes and every non-float value computed from shapes
    alone (``Shape``, and the integer and boolean ops that read only shapes and constants: sizes, slice bounds,
    position ranges, causal masks) replaced by an initializer. Float computations stay as they are, so the ops the
    runtime verifies are the artifact's own."""
    model = copy.deepcopy(model)
    graph = model.graph
    for value in graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    del graph.value_info[:]
    shapes = _inferred_shapes(model)
    known: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    folded: dict[str, np.ndarray] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        values = _fold(node, known, folded, shapes)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            known[name] = folded[name] = value
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in folded.items())
        log.debug("folded %d shape value(s) for the feeds' shapes", len(folded))
    return model


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The static shape of every tensor ONNX shape inference (with data propagation) can give."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = tuple(d.dim_value for d in tensor_type.shape.dim)
    return shapes


def _fold(node: onnx.NodeProto, known: dict[str, np.ndarray], folded: dict[str, np.ndarray],
          shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray] | None:
    """The outputs of ``node`` when it computes non-float values from shapes alone (at least one input folded
    before, every input known), else None."""
    if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx") and node.input[0] in shapes:
        shape = np.array(shapes[node.input[0]], dtype=np.int64)
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        return [shape[attrs.get("start", 0):attrs.get("end")]]
    inputs = [name for name in node.input if name]
    if (node.domain not in ("", "ai.onnx") or not inputs or not any(n in folded for n in inputs)
            or not all(n in known for n in inputs) or any(a.type in (onnx.AttributeProto.GRAPH,
                                                                     onnx.AttributeProto.GRAPHS)
                                                          for a in node.attribute)):
        return None
    from onnx.reference import ReferenceEvaluator

    try:
        values = ReferenceEvaluator(node).run(None, {n: known[n] for n in inputs})
    except Exception as exc:  # an op the reference cannot run here: leave it to the importer
        log.debug("cannot fold %s (%s): %s", node.name, node.op_type, exc)
        return None
    values = [np.asarray(v) for v in values]
    if any(v.dtype.kind in "fc" or v.size > FOLD_MAX_ELEMENTS for v in values):
        return None
    return values
