"""ONNX Runtime latency and accuracy: mq's `qdq` export vs the float model vs ONNX Runtime's own quantize_static.

A ResNet-18-shaped model (random weights, randomised BN statistics; 224x224), the same calibration images for both
quantizers, ONNX Runtime with all graph optimisations and 2 threads, batch 8. Accuracy is measured against the
float model on held-out inputs: top-1 agreement with the float predictions and the signal-to-quantization-noise
ratio of the logits. Run: `python benchmarks/ort_speed.py [--runs 30] [--out benchmarks/results/ort_speed.md]`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from resnet_case import MQ_QCONFIGS, ResNetCase, run_benchmark


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def measure(case: ResNetCase, work: Path, threads: int, runs: int) -> list[list[str]]:
    """Export the float model, mq's two configurations and quantize_static's two into ``work``, then time them."""
    float_path = case.float_onnx(work / "float.onnx")
    results: dict[str, Path] = {"float (fp32)": float_path}
    for label, qconfig in MQ_QCONFIGS:
        results[f"mq qdq ({label})"] = case.mq_export("qdq", qconfig, work / f"qdq-{qconfig}").path("onnx-qdq")
    for label, reduce_range in (("ORT quantize_static (U8S8 QDQ)", False),
                                ("ORT quantize_static (U8S8 QDQ, reduce_range)", True)):
        path = work / f"ort_static_{reduce_range}.onnx"
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process is noise here
        quantize_static(str(float_path), str(path), Reader("x", [c.numpy() for c in case.calib]),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
        results[label] = path
    runners = {}
    for label, path in results.items():
        sess = session(path, threads)
        runners[label] = lambda x, sess=sess: sess.run(None, {"x": x})[0]
    return case.measure(runners, runs)


def main() -> None:
    run_benchmark(__doc__.splitlines()[0], "ort_speed.md", "ONNX Runtime: speed and accuracy", measure,
                  lambda args: f"ONNX Runtime {ort.__version__} CPU, all graph optimisations, {args.threads} threads")


if __name__ == "__main__":
    main()
