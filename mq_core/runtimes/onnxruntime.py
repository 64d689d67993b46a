"""ONNX Runtime, with graph optimisations off (the bit-exact reference) and on (what a deployment runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx

from mq_core.runtimes.base import Runtime
from mq_core.runtimes.cpu import SATURATION_NOTE, int8_may_saturate

if TYPE_CHECKING:
    import onnxruntime


class OnnxRuntime(Runtime):
    """Optimisations off: Q/DQ run as written, so the result is bit-exact with the exact-rounding simulation."""

    name = "onnxruntime"
    description = "ONNX Runtime CPU, graph optimisations off (reference semantics)."
    module = "onnxruntime"
    install = "pip install 'mq-core[verify]'"
    domains = frozenset({"", "ai.onnx", "com.microsoft"})
    optimize: ClassVar[bool] = False

    def session(self, model: onnx.ModelProto, threads: int = 0) -> onnxruntime.InferenceSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session(model).run(None, feeds))


class OnnxRuntimeOptimized(OnnxRuntime):
    """Optimisations on: Q/DQ fused into integer kernels (QLinearConv, QGemm) where ONNX Runtime can: what a
    deployment on this CPU computes, including the int16 saturation of CPUs without VNNI."""

    name = "onnxruntime-opt"
    description = "ONNX Runtime CPU, all graph optimisations (integer kernels where it fuses Q/DQ)."
    optimize = True

    def notes(self, model: onnx.ModelProto) -> list[str]:
        return [f"{self.name}: {SATURATION_NOTE}"] if int8_may_saturate() else []
