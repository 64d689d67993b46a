"""TensorRT's implicit INT8 rules, as the ``tensorrt-legacy`` exporter and its verification need them.

TensorRT <= 10 builds an implicit-INT8 engine from a float network plus one symmetric int8 range per activation
tensor (amax = 127 * scale), and quantizes the weights itself. This module holds what follows from that: which
activation grids such a range can state (``activation_scales``), what TensorRT quantizes an activation with from a
range file (``dynamic_range_table``, ``calibration_cache_table``), which layers read the INT8 copy
(``int8_readers_only``), and the warnings where the engine will differ from the simulation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from mq_core.plugin_api import (
    ExportError,
    Graph,
    QuantTable,
    TensorQuant,
    in_graph_order,
    shorten,
    weights_as_device_quantizes,
)
from mq_trt.backend import TENSORRT
from mq_trt.formats import QMAX, read_calibration_cache, read_dynamic_range
from mq_trt.lint import LINEAR_OPS

log = logging.getLogger(__name__)


def activation_scales(float_model: onnx.ModelProto, table: QuantTable) -> dict[str, float]:
    """Per activation tensor its float32 scale, in graph order; refuses grids TensorRT's symmetric int8 ranges
    cannot express."""
    bad, activations = [], {}
    for name, entry in sorted(table.items()):
        if entry.kind != "activation":
            continue
        symmetric = entry.signed and entry.bits == 8 and entry.qmax == QMAX and not np.any(entry.zero_point != 0)
        if symmetric and not entry.per_channel and entry.scale.size == 1:
            activations[name] = entry
            continue
        bad.append(f"{name} ({'int' if entry.signed else 'uint'}{entry.bits} [{entry.qmin}, {entry.qmax}], "
                   f"zero point {np.ravel(entry.zero_point)[:2].tolist()}, "
                   f"{'per-channel' if entry.per_channel else 'per-tensor'})")
    if bad:
        raise ExportError(
            f"TensorRT's implicit INT8 ranges are symmetric int8 per tensor (amax = 127 * scale), but "
            f"{len(bad)} activation quantizer(s) use another grid: {shorten(bad)}. Prepare the model with the tensorrt "
            "backend's default qconfig."
        )
    return {e.name: float(np.float32(e.scale.reshape(-1)[0])) for e in in_graph_order(float_model, activations)}


def _activation_entry(name: str, scale: float) -> TensorQuant:
    """What TensorRT quantizes an activation with from its range: int8 [-128, 127], zero point 0."""
    return TensorQuant(name=name, kind="activation", scale=np.asarray(scale, dtype=np.float32),
                       zero_point=np.asarray(0, dtype=np.int64), qmin=-128, qmax=QMAX, bits=8, signed=True,
                       symmetric=True)


def dynamic_range_table(path: Path, axes: Mapping[str, int]) -> QuantTable:
    """The activations TensorRT quantizes from a dynamic-range JSON (scale = amax / 127)."""
    return {name: _activation_entry(name, amax / QMAX) for name, amax in read_dynamic_range(path).items()}


def calibration_cache_table(path: Path, axes: Mapping[str, int]) -> QuantTable:
    """The activations TensorRT quantizes from a calibration cache (its float32 scales)."""
    return {name: _activation_entry(name, scale) for name, scale in read_calibration_cache(path)[1].items()}


def int8_readers_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep an activation's Q/DQ only for the layers TensorRT runs in INT8 from its range.

    ``apply_table`` quantizes a ranged tensor for every reader. TensorRT reads it in INT8 in the layers it runs in
    INT8 from input ranges, the backend's quantized-input kinds (``LINEAR_OPS`` and Adds of two tensors); other
    readers (LayerNorm, Concat, average pooling ...) are taken to read the float tensor, as the simulation does.
    Where TensorRT hands them the INT8 copy instead, the engine differs (the exporter warns about such tensors).
    """
    graph = Graph(model)
    for pair in graph.qdq_pairs():
        if pair.quantize is None or pair.output in graph.outputs:
            continue
        for node in graph.consumers.get(pair.output, []):
            int8 = node.op_type in LINEAR_OPS or (
                node.op_type == "Add" and not any(graph.is_constant(i) for i in node.input))
            if not int8:
                node.input[:] = [pair.input if i == pair.output else i for i in node.input]
    return model


def warn_if_weights_differ(float_model: onnx.ModelProto, table: QuantTable) -> None:
    """TensorRT re-quantizes weights with max|w| / 127 per output channel; say so when the model's own weight
    quantizers (learned, MSE, per-tensor) differ, since the legacy engine then differs from the simulation."""
    weights = {k: v for k, v in table.items() if v.kind == "weight"}
    device = weights_as_device_quantizes(float_model, weights, TENSORRT.qconfig.weight.scheme)
    differ = sorted(name for name, entry in device.items() if weights[name].axis is None or not np.allclose(
        entry.scale, weights[name].scale, rtol=1e-6, atol=0))
    if differ:
        log.warning("TensorRT implicit INT8 quantizes weights itself (max|w| / 127 per output channel), not with "
                    "this model's weight scales for %s; the engine will differ from the simulation. The explicit "
                    "'tensorrt' exporter keeps them.", shorten(differ))


def warn_if_partially_quantized(qdq_model: onnx.ModelProto) -> None:
    """A range is per tensor, but input placement quantizes a tensor for some consumers only (a conv input that a
    LayerNorm or a pooling also reads): TensorRT decides per build whether those read the INT8 copy, so the engine
    may differ from the simulation there (verification assumes they read float, see ``int8_readers_only``)."""
    graph = Graph(qdq_model)
    mixed = sorted({pair.input for pair in graph.qdq_pairs() if pair.quantize is not None and any(
        c.op_type != "QuantizeLinear" and c not in pair.nodes for c in graph.consumers.get(pair.input, []))})
    if mixed:
        log.warning("TensorRT implicit INT8 ranges are per tensor, but %s %s quantized for some consumers and read "
                    "in float by others in the simulation; TensorRT may hand those the INT8 copy too, and the engine "
                    "then differs from the simulation there. The explicit 'tensorrt' exporter keeps the simulated "
                    "placement.",
                    shorten(mixed), "is" if len(mixed) == 1 else "are")
