"""OpenVINO latency and accuracy: mq's `openvino` export (FakeQuantize ONNX) vs the float model.

The same ResNet-18-shaped case as `ort_speed.py` (random weights, randomised BN statistics; 224x224, batch 8),
compiled by OpenVINO's CPU plugin with its int8 kernels (the default low-precision transformations), 2 inference
threads, one stream, f32 for the float parts. Accuracy is measured against the torch float model on held-out inputs.
On CPUs without VNNI the int8 kernels can saturate with 8-bit weights (see docs/backends/openvino.md); the
`reduce-range` row (7-bit weights) is the configuration that stays exact there.
Run: `python benchmarks/openvino_speed.py [--runs 30] [--out benchmarks/results/openvino_speed.md]`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
from resnet_case import MQ_QCONFIGS, ResNetCase, run_benchmark


def compiled(core: ov.Core, path: Path, threads: int) -> ov.CompiledModel:
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32",
              "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def measure(case: ResNetCase, work: Path, threads: int, runs: int, repeats: int) -> list[list[str]]:
    """Export the float model and mq's two openvino configurations into ``work``, compile and time them."""
    results: dict[str, Path] = {"float (fp32)": case.float_onnx(work / "float.onnx")}
    for label, qconfig in MQ_QCONFIGS:
        result = case.mq_export("openvino", qconfig, work / f"openvino-{qconfig}")
        results[f"mq openvino ({label})"] = result.path("onnx-fakequantize")
    core = ov.Core()
    runners = {}
    for label, path in results.items():
        request = compiled(core, path, threads).create_infer_request()
        runners[label] = lambda x, request=request: np.array(request.infer({0: x})[0], copy=True)
    return case.measure(runners, runs, repeats)


def main() -> None:
    run_benchmark(__doc__.splitlines()[0], "openvino_speed.md", "OpenVINO: speed and accuracy", measure,
                  lambda args: f"OpenVINO {ov.__version__} CPU plugin (int8 kernels), {args.threads} threads, 1 stream")


if __name__ == "__main__":
    main()
