"""ONNX Runtime latency and accuracy: mq's `qdq` export vs the float model vs ONNX Runtime's own quantize_static.

A ResNet-18-shaped model (random weights, randomised BN statistics; 224x224), the same calibration images for both
quantizers, ONNX Runtime with all graph optimisations and 2 threads, batch 8. Accuracy is measured against the
float model on held-out inputs: top-1 agreement with the float predictions and the signal-to-quantization-noise
ratio of the logits. Run: `python benchmarks/ort_speed.py [--runs 20] [--out benchmarks/results/ort_speed.md]`.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import mq_core as mq
from mq_core.cli.table import render_table
from mq_core.export.canonical import _quiet_exporter
from mq_core.runtimes.cpu import int8_may_saturate
from mq_core.testing.zoo import ResNet18, randomize_bn


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def accuracy(sess: ort.InferenceSession, inputs: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    name = sess.get_inputs()[0].name
    agree, signal, noise = 0, 0.0, 0.0
    for x, ref in zip(inputs, reference):
        out = sess.run(None, {name: x})[0]
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        signal += float((ref.astype(np.float64) ** 2).sum())
        noise += float(((out - ref).astype(np.float64) ** 2).sum())
    total = sum(len(x) for x in inputs)
    return 100.0 * agree / total, 10 * np.log10(signal / max(noise, 1e-30))


class Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ort_speed.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ResNet18().eval()
    randomize_bn(model)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
    held_out = [torch.randn(args.batch, 3, 224, 224, generator=gen) for _ in range(4)]
    with torch.no_grad():
        reference = [model(x).numpy() for x in held_out]
    x = held_out[0].numpy()
    work = Path(tempfile.mkdtemp(prefix="mq-bench-"))

    float_path = work / "float.onnx"
    with _quiet_exporter():
        program = torch.onnx.export(model, (held_out[0],), dynamo=True, input_names=["x"], optimize=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    onnx.save(program.model_proto, float_path)

    rows: list[list[str]] = []
    results: dict[str, Path] = {"float (fp32)": float_path}
    for label, qconfig in (("mq qdq (w8a8)", None), ("mq qdq (reduce-range, w7a8)", "reduce-range")):
        qmodel = mq.prepare(model, "qdq", held_out[0][:2], qconfig=qconfig)
        mq.calibrate(qmodel, calib, progress=False)
        results[label] = mq.export(qmodel, held_out[0][:2], work / label.split()[2].strip("(),")).path("onnx-qdq")
    for label, reduce_range in (("ORT quantize_static (U8S8 QDQ)", False),
                                ("ORT quantize_static (U8S8 QDQ, reduce_range)", True)):
        path = work / f"ort_static_{reduce_range}.onnx"
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process is noise here
        quantize_static(str(float_path), str(path), Reader("x", [c.numpy() for c in calib]),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
        results[label] = path

    base = None
    for label, path in results.items():
        sess = session(path, args.threads)
        ms = latency_ms(sess, x, args.runs)
        top1, sqnr = accuracy(sess, [h.numpy() for h in held_out], reference)
        base = base or ms
        rows.append([label, f"{ms:.1f}", f"{base / ms:.2f}x", f"{top1:.1f}%", f"{sqnr:.1f}"])

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    header = (f"ResNet-18 shape, 224x224, batch {args.batch}, ONNX Runtime {ort.__version__} CPU, all graph "
              f"optimisations, {args.threads} threads, median of {args.runs} runs.\n"
              f"Machine: {cpu}, {platform.machine()}, VNNI: {'no' if int8_may_saturate() else 'yes/unknown'}; "
              f"Python {platform.python_version()}, torch {torch.__version__}, mq-core {mq.__version__}.\n"
              "Accuracy vs the float model on 32 held-out inputs: SQNR of the logits (the meaningful number for "
              "random weights) and top-1 agreement with the float predictions.\n")
    table = render_table(["model", "latency ms", "speed-up vs fp32", "top-1 agreement", "SQNR dB"], rows)
    text = header + "\n" + table + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# ONNX Runtime: speed and accuracy\n\n```text\n" + text + "```\n")


if __name__ == "__main__":
    main()
