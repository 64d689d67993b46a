"""ONNX Runtime latency and accuracy: float vs mq's `qdq` and `qdq-ort` exports vs ONNX Runtime's quantize_static.

A ResNet-18-shaped model (random weights, randomised BN statistics; 224x224), the same calibration images for both
quantizers (8-bit weights per channel and 8-bit activations for both: mq's qdq default, quantize_static's U8S8),
ONNX Runtime with all graph optimisations and 2 threads, batch 8. Every row's session has the same options; intra-op
thread spinning is off for all of them: the rows are timed interleaved, and a session's pool threads spinning after
its call would take a core from the next row's call (on 2 cores that inflated every quantized row by up to 1.7x,
unevenly). Accuracy is measured against the float model on held-out inputs: top-1 agreement with the float
predictions and the signal-to-quantization-noise ratio of the logits. Both mq exports are verified with `mq.verify`
(ONNX Runtime with optimisations off and on) before they are timed; a failed verification stops the benchmark.
Run: `python benchmarks/ort_speed.py [--runs 30] [--repeats 3] [--out benchmarks/results/ort_speed.md]`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from resnet_case import ResNetCase, run_benchmark

import mq_core as mq

#: The row the second speed-up column compares with.
PEER = "ORT quantize_static (U8S8 QDQ)"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def mq_exports(case: ResNetCase, work: Path) -> dict[str, Path]:
    """mq's default qdq configuration exported with ``qdq`` and ``qdq-ort``, each verified before it is timed."""
    example = case.held_out[0][:2]
    qmodel = mq.prepare(case.model, "qdq", example)
    mq.calibrate(qmodel, case.calib, progress=False)
    paths = {}
    for exporter, kind in (("qdq", "onnx-qdq"), ("qdq-ort", "onnx-qdq-ort")):
        result = mq.export(qmodel, example, work / exporter, exporter=exporter)
        report = mq.verify(result, example, runtimes=["onnxruntime", "onnxruntime-opt"])
        if not report.passed:
            raise SystemExit(f"mq.verify failed for the {exporter} export; not timing it:\n{report.table()}")
        paths[f"mq {exporter} (w8a8, verified)"] = result.path(kind)
    return paths


def measure(case: ResNetCase, work: Path, threads: int, runs: int, repeats: int) -> list[list[str]]:
    """Export the float model, mq's two exports and quantize_static's two formats into ``work``, then time them."""
    float_path = case.float_onnx(work / "float.onnx")
    results: dict[str, Path] = {"float (fp32)": float_path, **mq_exports(case, work)}
    for label, fmt in ((PEER, QuantFormat.QDQ), ("ORT quantize_static (U8S8 QOperator)", QuantFormat.QOperator)):
        path = work / f"ort_static_{fmt.name}.onnx"
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process is noise here
        quantize_static(str(float_path), str(path), Reader("x", [c.numpy() for c in case.calib]),
                        quant_format=fmt, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        results[label] = path
    runners = {}
    for label, path in results.items():
        sess = session(path, threads)
        runners[label] = lambda x, sess=sess: sess.run(None, {"x": x})[0]
    return case.measure(runners, runs, repeats, reference=PEER)


def main() -> None:
    run_benchmark(__doc__.splitlines()[0], "ort_speed.md", "ONNX Runtime: speed and accuracy", measure,
                  lambda args: f"ONNX Runtime {ort.__version__} CPU, all graph optimisations, {args.threads} threads, "
                               "no thread spinning", reference=PEER)


if __name__ == "__main__":
    main()
