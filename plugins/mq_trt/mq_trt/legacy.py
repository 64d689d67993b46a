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

from dataclasses import dataclass
from typing import Any

from mq_core.plugin_api import ExportContext, RangesFile, RangesFileExporter, TensorQuant
from mq_trt.backend import TENSORRT
from mq_trt.formats import cache_header, calibration_cache, dynamic_range_json, version_token
from mq_trt.implicit import (
    activation_scales,
    calibration_cache_table,
    dynamic_range_table,
    int8_readers_only,
    warn_if_partially_quantized,
    warn_if_weights_differ,
)


class TensorRTLegacyExporter(RangesFileExporter):
    name = "tensorrt-legacy"
    description = ("TensorRT <= 10 implicit INT8: float ONNX + dynamic-range JSON (amax = 127 * scale) + "
                   "EntropyCalibration2 calibration cache.")
    backends = ("tensorrt",)
    float_description = "Float ONNX (no Q/DQ, BN folded) for TensorRT implicit INT8 with the ranges below."
    files = (RangesFile("dynamic-range", ".dynamic_range.json", dynamic_range_table,
                        "Per activation tensor amax = 127 * scale: ITensor.set_dynamic_range(-amax, amax)."),
             RangesFile("calibration-cache", ".calibration.cache", calibration_cache_table,
                        "TensorRT calibration cache (scale = amax / 127 as float32 hex): "
                        "trtexec --int8 --calib=<file>."))
    propagate = False
    device_weights = TENSORRT.qconfig.weight.scheme
    runnable_model = staticmethod(int8_readers_only)

    @dataclass(frozen=True)
    class Options(RangesFileExporter.Options):
        """name: file name stem (``model`` -> ``model.float.onnx``, ``model.dynamic_range.json``,
        ``model.calibration.cache``).
        trt_version: the TensorRT that reads the cache, as a version (``"10.3.0"``) or its cache token
        (``"100300"``); TensorRT ignores a cache written for another version. Default 10.0.1, the first TensorRT 10
        release.
        """

        trt_version: str = "10.0.1"

        def __post_init__(self) -> None:
            version_token(self.trt_version)

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        ordered = activation_scales(*ctx.float_model())  # (float ONNX, its table), computed once per export
        warn_if_weights_differ(*ctx.float_model())
        warn_if_partially_quantized(ctx.qdq_model)
        return {"dynamic-range": dynamic_range_json(ordered),
                "calibration-cache": calibration_cache(cache_header(ctx.options.trt_version), ordered)}
