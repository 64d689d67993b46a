"""The ``tensorrt-legacy`` exporter: implicit INT8 for TensorRT <= 10 (removed in TensorRT 11).

Implicit quantization builds from a float network plus one range per activation tensor, and quantizes the
weights itself. The exporter writes ``<name>.float.onnx`` (Q/DQ removed, BN folded, weights dequantized) and the
two range files TensorRT users feed it (``mq_trt.formats``): ``<name>.dynamic_range.json`` and
``<name>.calibration.cache``.

Weights carry no range: TensorRT quantizes them per output channel with scale max|w| / 127. Verification
rebuilds exactly that (activations parsed back from the written files and quantized for the layers TensorRT runs
in INT8, weights recomputed from the float ONNX) and runs it, so a file that says something else than the
simulation fails ``mq.verify``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from mq_core.errors import ExportError
from mq_core.export.exporter import ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.onnx_graph import Graph
from mq_core.export.quant_table import QuantTable, TensorQuant, weights_as_device_quantizes
from mq_core.export.ranges import in_graph_order, rebuild_qdq
from mq_trt.backend import TENSORRT
from mq_trt.formats import (
    QMAX,
    cache_header,
    calibration_cache,
    dynamic_range_json,
    read_calibration_cache,
    read_dynamic_range,
    version_token,
)
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
            f"{len(bad)} activation quantizer(s) use another grid: {', '.join(bad[:8])}"
            f"{' ...' if len(bad) > 8 else ''}. Prepare the model with the tensorrt backend's default qconfig."
        )
    return {e.name: float(np.float32(e.scale.reshape(-1)[0])) for e in in_graph_order(float_model, activations)}


def _activation_entry(name: str, scale: float) -> TensorQuant:
    """What TensorRT quantizes an activation with from its range: int8 [-128, 127], zero point 0."""
    return TensorQuant(name=name, kind="activation", scale=np.asarray(scale, dtype=np.float32),
                       zero_point=np.asarray(0, dtype=np.int64), qmin=-128, qmax=QMAX, bits=8, signed=True,
                       symmetric=True)


class TensorRTLegacyExporter(Exporter):
    name = "tensorrt-legacy"
    description = ("TensorRT <= 10 implicit INT8: float ONNX + dynamic-range JSON (amax = 127 * scale) + "
                   "EntropyCalibration2 calibration cache.")
    backends = ("tensorrt",)

    @dataclass(frozen=True)
    class Options(Exporter.Options):
        """name: file name stem (``model`` -> ``model.float.onnx``, ``model.dynamic_range.json``,
        ``model.calibration.cache``).
        trt_version: the TensorRT that reads the cache, as a version (``"10.3.0"``) or its cache token
        (``"100300"``); TensorRT ignores a cache written for another version. Default 10.0.1, the first TensorRT 10
        release.
        """

        trt_version: str = "10.0.1"

        def __post_init__(self) -> None:
            version_token(self.trt_version)

    def export(self, ctx: ExportContext) -> None:
        float_model, table = ctx.float_model()
        ordered = activation_scales(float_model, table)
        _warn_if_weights_differ(float_model, table)
        _warn_if_partially_quantized(ctx.qdq_model)
        stem = ctx.options.name
        ctx.save_onnx(f"{stem}.float.onnx", float_model, "onnx-float",
                      "Float ONNX (no Q/DQ, BN folded) for TensorRT implicit INT8 with the ranges below.")
        ctx.save_json(f"{stem}.dynamic_range.json", dynamic_range_json(ordered), "dynamic-range",
                      "Per activation tensor amax = 127 * scale: ITensor.set_dynamic_range(-amax, amax).")
        header = cache_header(ctx.options.trt_version)
        ctx.save_text(f"{stem}.calibration.cache", calibration_cache(header, ordered), "calibration-cache",
                      "TensorRT calibration cache (scale = amax / 127 as float32 hex): trtexec --int8 --calib=<file>.")

    def runnables(self, result: ExportResult) -> list[Runnable]:
        """The float ONNX with Q/DQ put back as TensorRT would: activations from each ranges file as written,
        weights per output channel with max|w| / 127 from the float weights."""
        float_model = onnx.load(result.path("onnx-float"))
        weights = {k: v for k, v in result.table.items() if v.kind == "weight"}
        device = weights_as_device_quantizes(float_model, weights, TENSORRT.qconfig.weight.scheme)
        amax = read_dynamic_range(result.path("dynamic-range"))
        _, cached = read_calibration_cache(result.path("calibration-cache"))
        sources = {
            "dynamic-range": {name: a / QMAX for name, a in amax.items()},
            "calibration-cache": cached,
        }
        runnables = []
        for artifact, scales in sources.items():
            table = {**device, **{n: _activation_entry(n, s) for n, s in scales.items()}}
            rebuilt = rebuild_qdq(float_model, table, artifact, f"float ONNX + {artifact} as TensorRT quantizes it")
            runnables.append(Runnable(artifact, int8_readers_only(rebuilt.model), rebuilt.description))
        return runnables


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


def _warn_if_weights_differ(float_model: onnx.ModelProto, table: QuantTable) -> None:
    """TensorRT re-quantizes weights with max|w| / 127 per output channel; say so when the model's own weight
    quantizers (learned, MSE, per-tensor) differ, since the legacy engine then differs from the simulation."""
    weights = {k: v for k, v in table.items() if v.kind == "weight"}
    device = weights_as_device_quantizes(float_model, weights, TENSORRT.qconfig.weight.scheme)
    differ = sorted(name for name, entry in device.items() if weights[name].axis is None or not np.allclose(
        entry.scale, weights[name].scale, rtol=1e-6, atol=0))
    if differ:
        log.warning("TensorRT implicit INT8 quantizes weights itself (max|w| / 127 per output channel), not with "
                    "this model's weight scales for %s; the engine will differ from the simulation. The explicit "
                    "'tensorrt' exporter keeps them.", ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else ""))


def _warn_if_partially_quantized(qdq_model: onnx.ModelProto) -> None:
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
                    ", ".join(mixed[:8]) + (" ..." if len(mixed) > 8 else ""), "is" if len(mixed) == 1 else "are")
