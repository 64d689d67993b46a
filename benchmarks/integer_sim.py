"""What the integer-exact simulation costs, and what it buys: ResNet-18 shape, W8A8 ``qdq``.

1. CPU time of this process (median of interleaved calls, one torch thread: on a shared machine the wall time
   swings with the other processes' load, the CPU time much less): calibration (``mq.calibrate`` on 2 batches,
   observers on), and an evaluation forward pass of the calibrated model (``torch.no_grad``), each with the default
   float simulation and with ``mq.integer_simulation`` on. Calibration runs with quantization off, so the integer
   ops compute their float ops there; evaluation pays for the float64 integer convolutions.
2. Agreement of each simulation with ONNX Runtime with its integer kernels (``onnxruntime-opt``) on the held-out
   images: max steps and exact fraction of the logits.

QAT and gradient-based PTQ methods (AdaRound, BRECQ, QDrop) do not run in integer mode: the integer ops have no
gradients and refuse to run where autograd records. Run: `python benchmarks/integer_sim.py [--size 112]
[--batch 8] [--runs 5] [--out benchmarks/results/integer_sim.md]`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from resnet_case import interleaved_ms, machine_line

import mq_core as mq
from mq_core.runtimes.onnxruntime import OnnxRuntimeOptimized
from mq_core.testing.zoo import resnet18
from mq_core.text import render_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "integer_sim.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    calib = [torch.randn(shape, generator=gen) for _ in range(2)]
    held_out = torch.randn(shape, generator=gen)

    default = mq.prepare(resnet18(size=args.size), "qdq", held_out[:1])
    mq.calibrate(default, calib, progress=False)
    integer = copy.deepcopy(default)
    sim = mq.integer_simulation(integer)

    def evaluate(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(held_out)

    ms = interleaved_ms({
        "calibrate, default": lambda: mq.calibrate(default, calib, progress=False),
        "calibrate, integer": lambda: mq.calibrate(integer, calib, progress=False),
        "evaluate, default": lambda: evaluate(default),
        "evaluate, integer": lambda: evaluate(integer),
    }, runs=args.runs, warmup=1, clock=time.process_time)
    rows = [[step, f"{ms[f'{step}, default']:.0f}", f"{ms[f'{step}, integer']:.0f}",
             f"{ms[f'{step}, integer'] / ms[f'{step}, default']:.2f}x"] for step in ("calibrate", "evaluate")]

    with tempfile.TemporaryDirectory() as folder:
        result = mq.export(default, held_out[:2], folder)
        model = onnx.load(result.path("onnx-qdq"))
        logits = OnnxRuntimeOptimized().run(model, {model.graph.input[0].name: held_out.numpy()})[0]
    step = float(list(mq.quantizers(default, weights=False).values())[-1].scale)
    agreement = []
    for label, qmodel in (("default", default), ("integer", integer)):
        with torch.no_grad():
            steps = np.abs(qmodel(held_out).numpy() - logits) / step
        agreement.append([label, f"{steps.max():.0f}", f"{100 * (steps < 0.5).mean():.1f}%"])

    text = (f"# Integer-exact simulation: cost and agreement\n\n```text\nResNet-18 shape, W8A8 qdq, {args.size}x"
            f"{args.size}, batch {args.batch}, 1 torch thread, CPU time, median of {args.runs} interleaved calls; "
            f"{len(sim.ops)} integer ops ({', '.join(sorted(set(sim.ops.values())))}).\n{machine_line()} "
            f"ONNX Runtime {onnxruntime.__version__}.\n\n"
            + render_table(["step", "default CPU ms", "integer CPU ms", "integer / default"], rows)
            + "\n\nLogits vs onnxruntime-opt (integer kernels) on the held-out batch:\n\n"
            + render_table(["simulation", "max steps", "exact"], agreement) + "\n```\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
