"""The ``tensorrt`` exporter: the explicit-quantization Q/DQ ONNX that TensorRT 10/11 builds INT8 engines from.

The canonical QDQ ONNX of a model prepared for TensorRT already has TensorRT's form (int8 symmetric Q/DQ on the
inputs of the linear layers and residual adds, int8 weight codes + DequantizeLinear per output channel), so the
exporter's work is to refuse one that does not: a custom qconfig or a hand-edited quantizer can produce uint8
activations, per-tensor weights or codes at -128, which TensorRT either rejects at build time or silently runs in
float. ``lint_qdq`` names every such problem before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mq_core.plugin_api import ExportContext, ExportError, QDQExporter, check_choice
from mq_trt.lint import format_violations, lint_qdq

log = logging.getLogger(__name__)

LINT_MODES = ("error", "warn")


class TensorRTExporter(QDQExporter):
    name = "tensorrt"
    description = ("Explicit-quantization Q/DQ ONNX for TensorRT 10/11 (int8 symmetric, per-channel narrow-range "
                   "weights), checked against TensorRT's Q/DQ placement rules.")
    backends = ("tensorrt",)
    usage = "Explicit-quantization Q/DQ ONNX for TensorRT 10/11: trtexec --onnx=<file> --stronglyTyped."

    @dataclass(frozen=True)
    class Options(QDQExporter.Options):
        """name: file name stem (``model`` -> ``model.onnx``).
        lint: ``"error"`` refuses an ONNX that breaks TensorRT's Q/DQ rules (see ``mq_trt.lint``); ``"warn"`` logs
        the violations and writes it anyway (TensorRT may then reject it or run some layers in float).
        """

        lint: str = "error"

        def __post_init__(self) -> None:
            check_choice("lint", self.lint, LINT_MODES)

    def export(self, ctx: ExportContext) -> None:
        violations = lint_qdq(ctx.qdq_model)
        if violations:
            summary = (f"the Q/DQ ONNX breaks {len(violations)} TensorRT explicit-quantization rule(s):\n"
                       f"{format_violations(violations)}")
            if ctx.options.lint == "error":
                raise ExportError(
                    f"{summary}\nTensorRT needs int8 symmetric activations per tensor and int8 symmetric "
                    "narrow-range weights per output channel: prepare the model with the tensorrt backend's default "
                    "qconfig (or a preset that keeps its grids), or pass lint='warn' to write it anyway."
                )
            log.warning("%s\nwriting it anyway (lint='warn').", summary)
        super().export(ctx)
