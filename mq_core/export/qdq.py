"""The core's ``qdq`` exporters: the canonical QDQ ONNX as is (ONNX Runtime, and any runtime reading QDQ), and
``qdq-ort``, the same graph rewritten for ONNX Runtime's CPU integer kernels (``mq_core.export.ort_kernels``).

Backends whose artifact *is* the canonical QDQ ONNX (TVM, OpenVINO's QDQ form, TensorRT after its lint) subclass
``QDQExporter`` and only change the name, the backends served and the instructions written into the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from mq_core.errors import check_choice
from mq_core.export.exporter import ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.ort_kernels import NARROW_CONV_MODES, for_onnxruntime, observed

log = logging.getLogger(__name__)


class QDQExporter(Exporter):
    name = "qdq"
    description = "Canonical QDQ ONNX (QuantizeLinear/DequantizeLinear, int8 weight initializers), opset 18."
    backends = ("*",)
    #: How to run the file, recorded with the artifact in the manifest.
    usage: ClassVar[str] = ("QDQ ONNX: run with ONNX Runtime (U8 activations fuse into QLinearConv/QGemm), "
                            "OpenVINO, TVM.")

    def export(self, ctx: ExportContext) -> None:
        ctx.save_onnx(f"{ctx.options.name}.onnx", ctx.qdq_model, "onnx-qdq", self.usage)


class ORTQDQExporter(Exporter):
    name = "qdq-ort"
    description = ("QDQ ONNX rewritten for ONNX Runtime's CPU integer kernels: narrow-input (RGB) convolutions "
                   "through SpaceToDepth or channel padding, spatial means as GlobalAveragePool; standard ops, "
                   "the same integers.")
    backends = ("qdq",)

    @dataclass(frozen=True)
    class Options(Exporter.Options):
        """name: file name stem (``model`` -> ``model.onnx``).
        narrow_convs: how a convolution whose input channels are not a multiple of 4 (an RGB stem), which ONNX
        Runtime's fast symmetric int8 kernel refuses, is fed: ``"space-to-depth"`` rewrites a stride-2 one as a
        stride-1 one on SpaceToDepth(2) of its codes and pads the channels of the others; ``"pad"`` pads all of
        them with zero-point codes; ``"keep"`` leaves them as they are.
        """

        narrow_convs: str = "space-to-depth"

        def __post_init__(self) -> None:
            check_choice("narrow_convs", self.narrow_convs, NARROW_CONV_MODES,
                         " It sets how convolutions with a number of input channels that is not a multiple of 4 "
                         "are fed to ONNX Runtime's int8 kernel (see docs/backends/qdq.md).")

    def export(self, ctx: ExportContext) -> None:
        model, counts = for_onnxruntime(ctx.qdq_model, ctx.options.narrow_convs)
        log.info("qdq-ort: %s", ", ".join(f"{n} {op}" for op, n in counts.items() if n) or "nothing to rewrite")
        ctx.save_onnx(f"{ctx.options.name}.onnx", model, "onnx-qdq-ort",
                      "QDQ ONNX for ONNX Runtime's CPU provider with graph optimisations on (its default): "
                      "InferenceSession(<file>). Standard ops: any QDQ reader runs it.")

    def runnables(self, result: ExportResult) -> list[Runnable]:
        """The artifact as written, with the DequantizeLinear of each quantized tensor the rewrites no longer read
        restored unread (``ort_kernels.observed``), so the layer-wise check compares it and checks the rewritten
        convolution locally."""
        activations = [name for name, entry in result.table.items() if entry.kind == "activation"]
        return [Runnable(r.artifact, observed(r.model, activations),
                         f"{r.description} (verified with the input codes' DequantizeLinear restored, unread)")
                for r in super().runnables(result)]
