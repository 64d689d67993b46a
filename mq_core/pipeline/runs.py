"""What every verification needs around a runtime: the simulation run with its quantized tensors observed, the feeds
an ONNX graph takes, the runtimes a backend's artifacts run in, and the lines under a report's table.

``verify`` (outputs) and ``verify_layers`` (every quantized tensor) share these, so that both judge with the same
simulation and feed the runtimes the same arrays.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import UnknownNameError
from mq_core.plugins.lookup import get_runtime, list_runtimes
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.switches import quantizers
from mq_core.runtimes.base import Runtime


def trailer(failures: Sequence[str], skipped: Sequence[str], notes: Sequence[str]) -> str:
    """The lines under a report's table: failed checks that have no row, skipped runtimes, notes."""
    return "".join([*(f"\nFAIL: {f}" for f in failures), *(f"\nskipped: {s}" for s in skipped),
                    *(f"\nnote: {n}" for n in notes)])


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for o in outputs for t in flatten_outputs(o)]


def run_observed(
    qmodel: nn.Module, inputs: Sequence[Any],
    on_quantized: Callable[[FakeQuantizer, torch.Tensor, torch.Tensor], None] | None = None
) -> tuple[list[torch.Tensor], list[FakeQuantizer | None]]:
    """Run the prepared model (eval mode, no grad) and tell which activation quantizer produced each output.

    Returns the flattened outputs and, per output, the enabled activation quantizer whose output it is (None for a
    float output). The producer is found by identity (a forward hook keeps a weak reference to each quantizer's
    output), so the qparams that judge an output are the prepared model's own, whatever an export's files claim.
    ``on_quantized(fq, x, out)`` sees every enabled activation quantizer's input and output as they are computed.
    """
    produced: dict[int, tuple[weakref.ref[torch.Tensor], FakeQuantizer]] = {}

    def record(fq: nn.Module, args: Any, out: torch.Tensor) -> None:
        if isinstance(fq, FakeQuantizer) and fq.quant_enabled.item():
            produced[id(out)] = (weakref.ref(out), fq)
            if on_quantized is not None:
                on_quantized(fq, args[0], out)

    hooks = [fq.register_forward_hook(record) for fq in quantizers(qmodel, weights=False).values()]
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            outputs = flatten_outputs(qmodel(*inputs))
    finally:
        qmodel.train(was_training)
        for hook in hooks:
            hook.remove()
    producers: list[FakeQuantizer | None] = []
    for t in outputs:
        ref, fq = produced.get(id(t), (None, None))
        producers.append(fq if ref is not None and ref() is t else None)
    return outputs, producers


def feeds(model: onnx.ModelProto, inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The runtime feeds of ``model`` from tensors, each in the dtype its graph input declares (int64 token ids
    stay int64; a float64 array becomes the float32 the graph reads), else in the tensor's own dtype."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    out = {}
    for graph_input, tensor in zip(graph_inputs, inputs):
        array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        elem_type = graph_input.type.tensor_type.elem_type
        if elem_type != onnx.TensorProto.UNDEFINED:
            array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type), copy=False)
        out[graph_input.name] = np.ascontiguousarray(array)
    return out


def select_runtimes(backend: Backend, runtimes: Sequence[str] | str | None, skipped: list[str]) -> list[Runtime]:
    """The runtimes that run ``backend``'s artifacts: every registered one for ``"all"``, the given names or Runtime
    objects (each must exist: ``UnknownNameError``), or by default the backend's own list, where a runtime whose
    plugin is not installed is left out with the reason appended to ``skipped``. Whether a runtime is available
    and can run a given artifact is the caller's question (``Runtime.available``, ``Runtime.can_run``)."""
    if runtimes == "all":
        return [get_runtime(n) for n in list_runtimes()]
    if runtimes is not None:
        return [get_runtime(n) for n in ([runtimes] if isinstance(runtimes, str) else runtimes)]
    chosen = []
    for name in backend.runtimes:
        try:
            chosen.append(get_runtime(name))
        except UnknownNameError as exc:
            skipped.append(str(exc))
    return chosen


def run_float(qmodel: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The prepared model's flattened outputs with every quantizer's quantization off (eval mode, no grad; the
    switches are restored): the float model the simulation quantizes, with its folded BN and fusions."""
    fqs = list(quantizers(qmodel).values())
    states = [bool(fq.quant_enabled.item()) for fq in fqs]
    was_training = qmodel.training
    qmodel.eval()
    try:
        for fq in fqs:
            fq.enable_quantization(False)
        with torch.no_grad():
            return flatten_outputs(qmodel(*inputs))
    finally:
        for fq, state in zip(fqs, states):
            fq.enable_quantization(state)
        qmodel.train(was_training)
