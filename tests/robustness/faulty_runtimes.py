"""Runtimes that fail on purpose, for the runtime-isolation tests. A module of their own, importing only what a
runtime worker process imports anyway (numpy, onnx, ONNX Runtime's runtime class), so that the worker that
unpickles them starts in a fraction of a second instead of importing the test module, torch included."""

from __future__ import annotations

import os

import numpy as np
import onnx

from mq_core.runtimes.onnxruntime import OnnxRuntime


class AbortingRuntime(OnnxRuntime):
    """ONNX Runtime, except that running a model aborts the process (as a native crash does)."""

    name = "aborting"

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        os.abort()


class RaisingRuntime(OnnxRuntime):
    """ONNX Runtime, except that it raises on every model."""

    name = "raising"

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("unsupported node Foo")
