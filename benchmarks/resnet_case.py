"""What the runtime benchmarks share: the ResNet-18-shaped case, its float ONNX, timing, accuracy and the machine line.

Both runtime benchmarks (`ort_speed.py`, `openvino_speed.py`) measure the same model on the same inputs, so their
numbers can be read side by side; this module holds that case once.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

import mq_core as mq
from mq_core.export.canonical import quiet_exporter
from mq_core.runtimes.cpu import VNNI_FLAGS
from mq_core.testing.zoo import ResNet18, randomize_bn
from mq_core.text import render_table

#: The two mq configurations benchmarked: the backend's default (8-bit weights and activations on both benchmarked
#: backends) and 7-bit weights (exact on CPUs without VNNI).
MQ_QCONFIGS: tuple[tuple[str, str | None], ...] = (("default, w8a8", None), ("reduce-range, w7a8", "reduce-range"))


@dataclass
class ResNetCase:
    """A ResNet-18-shaped float model (random weights, randomised BN), calibration images and held-out inputs."""

    model: torch.nn.Module
    calib: list[torch.Tensor]
    held_out: list[torch.Tensor]
    reference: list[np.ndarray]

    @classmethod
    def build(cls, batch: int) -> ResNetCase:
        torch.manual_seed(0)
        model = ResNet18().eval()
        randomize_bn(model)
        gen = torch.Generator().manual_seed(1)
        calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
        held_out = [torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(4)]
        with torch.no_grad():
            reference = [model(x).numpy() for x in held_out]
        return cls(model, calib, held_out, reference)

    def float_onnx(self, path: Path) -> Path:
        """The float model as ONNX (dynamo exporter, dynamic batch, input named ``x``)."""
        with quiet_exporter():
            program = torch.onnx.export(self.model, (self.held_out[0],), dynamo=True, input_names=["x"],
                                        optimize=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
        onnx.save(program.model_proto, path)
        return path

    def mq_export(self, backend: str, qconfig: str | None, out: Path) -> mq.ExportResult:
        """Prepare, calibrate on the shared calibration images and export with ``backend``'s default exporter."""
        example = self.held_out[0][:2]
        qmodel = mq.prepare(self.model, backend, example, qconfig=qconfig)
        mq.calibrate(qmodel, self.calib, progress=False)
        return mq.export(qmodel, example, out)

    def measure(self, runners: dict[str, Callable[[np.ndarray], np.ndarray]], runs: int, repeats: int = 1,
                reference: str | None = None) -> list[list[str]]:
        """One table row per runner: latency (interleaved, see ``interleaved_ms``) in each of ``repeats``
        measurements, the speed-up over the first runner (the float model) and over ``reference`` (a runner's label)
        in each, top-1 agreement and SQNR."""
        x = self.held_out[0].numpy()
        calls = {label: functools.partial(run, x) for label, run in runners.items()}
        measured = [interleaved_ms(calls, runs) for _ in range(repeats)]
        bases = [next(iter(runners))] + ([reference] if reference else [])
        rows = []
        for label, run in runners.items():
            top1, sqnr = self.accuracy(run)
            ratios = [" / ".join(f"{m[base] / m[label]:.2f}x" for m in measured) for base in bases]
            rows.append([label, " / ".join(f"{m[label]:.1f}" for m in measured), *ratios, f"{top1:.1f}%",
                         f"{sqnr:.1f}"])
        return rows

    def accuracy(self, run: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        """Top-1 agreement with the float predictions (%) and SQNR of the logits (dB) over the held-out inputs."""
        agree, signal, noise = 0, 0.0, 0.0
        for x, ref in zip(self.held_out, self.reference):
            out = run(x.numpy())
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            signal += float((ref.astype(np.float64) ** 2).sum())
            noise += float(((out - ref).astype(np.float64) ** 2).sum())
        total = sum(len(x) for x in self.held_out)
        return 100.0 * agree / total, 10 * np.log10(signal / max(noise, 1e-30))


def interleaved_ms(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 3,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time (ms) of each call by ``clock`` (wall time by default; ``time.process_time`` for this process's
    CPU time), after ``warmup`` calls each.

    The calls are interleaved (one call of every entry per round) so that a shared machine's load drifting over
    the run slows every row alike; the ratios between rows stay meaningful even when absolute times do not.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(runs):
        for label, call in calls.items():
            start = clock()
            call()
            times[label].append(1000 * (clock() - start))
    return {label: statistics.median(t) for label, t in times.items()}


def write_report(title: str, header: str, rows: list[list[str]], out: Path, reference: str | None = None) -> None:
    """Print the table and write it (with its header: setup, machine, versions) to ``out`` as Markdown."""
    columns = ["model", "latency ms", "speed-up vs fp32", *([f"vs {reference}"] if reference else []),
               "top-1 agreement", "SQNR dB"]
    table = render_table(columns, rows)
    text = (f"{header}\n{machine_line()}\nAccuracy vs the torch float model on the held-out inputs: SQNR of the "
            "logits (the meaningful number for random weights) and top-1 agreement with the float predictions.\n"
            f"\n{table}\n")
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {title}\n\n```text\n{text}```\n")


def run_benchmark(
    description: str,
    result_name: str,
    title: str,
    measure: Callable[[ResNetCase, Path, int, int, int], list[list[str]]],
    runtime: Callable[[argparse.Namespace], str],
    reference: str | None = None,
) -> None:
    """The command line both runtime benchmarks share: parse ``--runs/--repeats/--threads/--batch/--out``, build
    the case, let ``measure(case, work_dir, threads, runs, repeats)`` export into a temporary folder and time, and
    write the report (``runtime(args)`` describes the runtime's settings in its header; ``reference`` names the row
    a second speed-up column compares with)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=30, help="timed calls per model in one measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements in this invocation, each reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / result_name)
    args = parser.parse_args()

    case = ResNetCase.build(args.batch)
    with tempfile.TemporaryDirectory(prefix="mq-bench-") as tmp:
        rows = measure(case, Path(tmp), args.threads, args.runs, args.repeats)
    header = (f"ResNet-18 shape, 224x224, batch {args.batch}, {runtime(args)}; median of {args.runs} interleaved "
              f"runs, measured {args.repeats} times in this invocation (the columns list each measurement).")
    write_report(title, header, rows, args.out, reference)


def vnni() -> str:
    """Whether the CPU has int8 dot-product instructions (VNNI), from the Linux CPU flags."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpuinfo.exists():
        return "unknown (not x86 Linux)"
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), set())
    found = sorted(flags & VNNI_FLAGS)
    return f"yes ({', '.join(found)})" if found else f"no (no {', '.join(sorted(VNNI_FLAGS))} flag: AVX2 int8 path)"


def machine_line() -> str:
    """CPU model, architecture, whether it has VNNI, and the Python/torch/mq versions."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if cpuinfo.exists() else platform.processor()
    return (f"Machine: {cpu}, {platform.machine()}, {os.cpu_count()} logical CPUs, VNNI: {vnni()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, mq-core {mq.__version__}.")
