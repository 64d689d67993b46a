"""OpenVINO runtimes: run an exported ONNX (QDQ or FakeQuantize) on OpenVINO's CPU plugin to verify it.

Two runtimes, because OpenVINO's int8 kernels are only exact on some CPUs (see ``mq_core.runtimes.cpu``):

* ``openvino``: what the artifact means. On CPUs whose int8 kernels are exact (VNNI) it runs them; on CPUs where
  they would saturate it compiles with ``LP_TRANSFORMS_MODE=NO`` instead, so OpenVINO evaluates the same
  FakeQuantize graph in float, and the report carries a note saying so.
* ``openvino-int8``: always the int8 kernels: what a deployment on *this* CPU computes, saturation included.

Settings pinned so that a verification means the same thing on every run:

* ``INFERENCE_NUM_THREADS=1`` and ``NUM_STREAMS=1``: one fixed order of every float reduction (with 2 threads the
  same model compiled twice gave outputs up to 4.5 steps apart on a busy 2-core machine);
* ``INFERENCE_PRECISION_HINT=f32``: float parts stay f32 (CPUs with AMX/AVX512-BF16 would use bf16);
* ``DYNAMIC_QUANTIZATION_GROUP_SIZE=0``: no run-time quantization of float activations.

Tolerance: 2 steps. OpenVINO's FakeQuantize computes ``round((x - lo) / (hi - lo) * (levels - 1))``, which rounds
differently from QuantizeLinear at ties (only about half of exact .5 ties agree), so one code can flip in an
intermediate tensor and move an output by slightly more than one step. For the same reason the runtimes declare
``ties_to_even = False``: the layer-wise verification does not count a one-step difference at an exact tie of the
simulation against them (inputs with few distinct values, such as 8-bit images scaled by a power of two, hit
ties often: 2.6% of the digits demo's input codes).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx

from mq_core.plugin_api import SATURATION_NOTE, Runtime, int8_may_saturate

if TYPE_CHECKING:
    import openvino

log = logging.getLogger(__name__)

#: Properties passed to ``compile_model`` (see the module docstring for why each is set).
CPU_CONFIG: dict[str, Any] = {
    "INFERENCE_NUM_THREADS": 1,
    "NUM_STREAMS": 1,
    "INFERENCE_PRECISION_HINT": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
}
#: Disables the low-precision transformations: FakeQuantize is evaluated in float instead of int8 kernels.
NO_INT8_KERNELS: dict[str, Any] = {"LP_TRANSFORMS_MODE": "NO"}


@functools.cache
def _core() -> openvino.Core:
    import openvino as ov

    return ov.Core()


class OpenVINORuntime(Runtime):
    name = "openvino"
    description = "OpenVINO CPU plugin; int8 kernels where they are exact on this CPU, else float FakeQuantize."
    module = "openvino"
    install = "pip install 'mq-openvino[verify]'"
    domains = frozenset({"", "ai.onnx", "org.openvinotoolkit"})
    tolerance = 2.0
    ties_to_even = False  # see the module docstring: FakeQuantize's round() at exact .5 ties
    #: Always use the int8 kernels, even where they saturate.
    force_int8: ClassVar[bool] = False

    def _emulated(self) -> bool:
        return not self.force_int8 and int8_may_saturate()

    def notes(self, model: onnx.ModelProto) -> list[str]:
        if self._emulated():
            return [f"{self.name}: ran FakeQuantize in float (LP_TRANSFORMS_MODE=NO) because {SATURATION_NOTE}; "
                    "`--runtime openvino-int8` runs the int8 kernels anyway"]
        if self.force_int8 and int8_may_saturate():
            return [f"{self.name}: {SATURATION_NOTE}"]
        return []

    def compile(self, model: onnx.ModelProto) -> openvino.CompiledModel:
        """Read ``model`` from memory and compile it for the CPU (see the module docstring for the settings)."""
        core = _core()
        config = {**CPU_CONFIG, **(NO_INT8_KERNELS if self._emulated() else {})}
        return core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config)

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = self.compile(model)
        request = compiled.create_infer_request()
        request.infer(feeds)
        return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(compiled.outputs))]


class OpenVINOInt8Runtime(OpenVINORuntime):
    name = "openvino-int8"
    description = "OpenVINO CPU plugin, always its int8 kernels (what this CPU computes, saturation included)."
    force_int8 = True
