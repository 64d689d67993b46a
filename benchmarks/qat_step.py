"""QAT training-step time and prepare() scaling: mq vs float vs torch.ao's FX QAT (the peer being measured).

1. One SGD training step (forward, cross-entropy, backward, update) of a ResNet-18-shaped model at 224x224,
   batch 16, on the CPU: the float model; mq QAT with fixed fake quantizers (``qdq`` backend, BN fold simulated),
   with the fast rounding path (torch's fake-quant kernels, what QAT uses for speed) and the exact path; and
   torch.ao's ``prepare_qat_fx`` with its x86 default QAT qconfig. Both see the calibration batch once and then
   train with their observers off (fixed qparams, the same work per step). The timed steps of all variants are
   interleaved so load drift on a shared machine affects them alike; the table gives median times and ratios of
   each of ``--repeats`` measurements in one invocation (the goal, issue 16: exact rounding <= 1.2x float and below
   torch.ao, in every one of them).
2. ``mq.prepare`` time on stacks of N, 2N, 4N and 8N residual blocks: linear scaling shows as a constant time per
   block (a 4x deeper model takes about 4x as long), quadratic as a time per block that grows with depth.

With ``--device cuda`` the models train on the GPU (each timed step ends with ``torch.cuda.synchronize()``, so
the time is the GPU's, not the kernel launches'), and the prepare() scaling, a CPU measurement, is left out; a
row that cannot run there (torch.ao's FX QAT, should a torch lack its CUDA kernels) says why instead of a time.
``--compile`` adds a ``torch.compile`` row for every model (compilation happens in the untimed warm-up steps; a
model that fails to compile gets a row with the error).

Only this benchmark imports torch.ao, as the peer tool measured; the library itself never does.
Run: `python benchmarks/qat_step.py [--steps 10] [--repeats 3] [--device cpu|cuda] [--compile] [--out FILE]`
(default output: results/qat_step.md on the CPU, results/qat_step_cuda.md on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from resnet_case import interleaved_ms, machine_line
from torch import nn

import mq_core as mq
from mq_core.testing.zoo import BasicBlock, ResNet18
from mq_core.text import render_table


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: nn.Module | None = None
               ) -> Callable[[], None]:
    """One SGD step of ``model``; ``params`` is the module that owns the parameters when ``model`` wraps it (a
    ``torch.compile`` of it)."""
    optimizer = torch.optim.SGD((params or model).parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def torch_ao_qat(model: nn.Module, x: torch.Tensor, calib: torch.Tensor) -> nn.Module:
    """torch.ao's FX QAT model, its observers run once on ``calib`` and then switched off (as mq's after calibrate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation warnings: it is the peer being measured
        from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        qat = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))
    qat(calib)
    qat.apply(disable_observer)
    return qat


def cuda_clock() -> float:
    """Wall time after the GPU has finished the work queued so far: what a step costs on the device."""
    torch.cuda.synchronize()
    return time.perf_counter()


def runnable(steps: dict[str, Callable[[], None]]) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The steps that run once without an error, and for the others the error (its first line): a model that
    cannot train on this device or cannot be compiled becomes a row saying so, not a crash of the benchmark."""
    failed = {}
    for label, step in steps.items():
        try:
            step()
        except Exception as exc:  # any failure of a peer or of the compiler is reported, the rest still measured
            first_line = (str(exc).strip().splitlines() or [""])[0]
            failed[label] = f"{type(exc).__name__}: {first_line}"
    return {label: step for label, step in steps.items() if label not in failed}, failed


def device_line(device: torch.device) -> str:
    """The machine line, and on CUDA the GPU's name and the CUDA version torch was built with."""
    if device.type != "cuda":
        return machine_line()
    return f"{machine_line()}\nGPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}."


class Stack(nn.Module):
    """A stem and ``depth`` residual blocks: the model whose depth is scaled for prepare()."""

    def __init__(self, depth: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[BasicBlock(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def prepare_seconds(depth: int, repeats: int = 5) -> float:
    x = torch.randn(1, 3, 16, 16)
    times = []
    for _ in range(repeats):
        model = Stack(depth).eval()
        start = time.perf_counter()
        mq.prepare(model, "qdq", x)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--repeats", type=int, default=3, help="measurements in this invocation, each reported")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=16, help="blocks of the shallow prepare() model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models train")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row for every model")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/qat_step.md (cpu) or results/qat_step_cuda.md (cuda)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / ("qat_step.md" if args.device == "cpu" else
                                                           "qat_step_cuda.md")

    torch.manual_seed(0)
    base = ResNet18().train()
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    models = {"float": copy.deepcopy(base)}
    for label, exact in (("mq QAT (fixed, fast rounding)", False), ("mq QAT (fixed, exact rounding)", True)):
        qmodel = mq.prepare(copy.deepcopy(base), "qdq", x[:2], mode="qat", exact=exact)
        mq.calibrate(qmodel, [x[:4]], progress=False)
        models[label] = qmodel.train()
    models["torch.ao prepare_qat_fx (x86)"] = torch_ao_qat(copy.deepcopy(base), x[:2], x[:4])
    x, y = x.to(device), y.to(device)
    steps = {label: train_step(m.to(device), x, y) for label, m in models.items()}
    if args.compile:
        copies = {label: copy.deepcopy(m) for label, m in models.items()}
        steps.update({f"{label} + torch.compile": train_step(torch.compile(m), x, y, params=m)
                      for label, m in copies.items()})
    steps, failed = runnable(steps) if device.type == "cuda" or args.compile else (steps, {})
    clock = cuda_clock if device.type == "cuda" else time.perf_counter
    measured = [interleaved_ms(steps, args.steps, warmup=2 if i == 0 else 0, clock=clock)
                for i in range(args.repeats)]
    rows = [[label, " / ".join(f"{m[label]:.0f}" for m in measured),
             " / ".join(f"{m[label] / m['float']:.2f}x" for m in measured)] for label in steps]
    rows += [[label, "did not run", error] for label, error in failed.items()]
    step_table = render_table(["training step", "ms (median)", "vs float"], rows)
    where = "on the CPU" if device.type == "cpu" else f"on {torch.cuda.get_device_name(device)}"
    header = (f"ResNet-18 shape, 224x224, batch {args.batch}, SGD step (forward, loss, backward, update) {where}, "
              f"{args.threads} torch threads, median of {args.steps} interleaved steps, measured {args.repeats} "
              "times in this invocation (the columns list each measurement); torch.ao is the peer measured.\n"
              f"{device_line(device)}\n\n{step_table}\n")
    if device.type == "cuda":
        print(header)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# QAT step time on CUDA\n\n```text\n{header}```\n")
        return

    depths = [args.depth * k for k in (1, 2, 4, 8)]
    seconds = {d: prepare_seconds(d) for d in depths}
    prepare_table = render_table(
        ["residual blocks", "mq.prepare seconds", "ms per block", "vs 4x shallower"],
        [[str(d), f"{seconds[d]:.3f}", f"{1000 * seconds[d] / d:.2f}",
          f"{seconds[d] / seconds[d // 4]:.2f}x" if d // 4 in seconds else "-"] for d in depths],
    )
    text = (f"{header}\nmq.prepare (qdq backend, trace + fold + placement) on a stack of residual blocks (16x16 "
            "input), best of 5; linear scaling means a constant time per block:\n\n"
            f"{prepare_table}\n")
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# QAT step time and prepare() scaling\n\n```text\n{text}```\n")


if __name__ == "__main__":
    main()
