"""Calibration throughput (images/s): ``mq.calibrate`` of a ResNet-18 shape at 224x224 with min/max and with a
histogram observer (KL, TensorRT's entropy calibration), against the float model's inference on the same batches.

The batches are made on the CPU, as a data loader delivers them, and ``mq.calibrate`` moves each one to the model's
device (included in the time, as in real use). One untimed calibration of a single batch first (CUDA context, cuDNN
autotuning, allocator warm-up), then the timed calibration of ``--batches`` batches; on CUDA the clock is read after
``torch.cuda.synchronize()``. The time includes turning the statistics into qparams at the end (the KL search).

Run: `python benchmarks/calibration_throughput.py [--device cpu|cuda] [--batches N] [--batch B]`. The defaults are
small on the CPU (3 batches of 8) and 20 batches of 64 on CUDA; the table is printed and written to
results/calibration_throughput[_cuda].md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from resnet_case import machine_line
from torch import nn

import mq_core as mq
from mq_core.testing.zoo import resnet18
from mq_core.text import render_table

#: Activation observers measured; weights keep the backend's (min/max per channel).
OBSERVERS = ("minmax", "kl")


def now(device: torch.device) -> float:
    """Wall time after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def float_seconds(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """Time of the float model's inference on ``batches`` (moved to ``device`` one by one), after one warm-up."""
    with torch.no_grad():
        model(batches[0].to(device))
        start = now(device)
        for batch in batches:
            model(batch.to(device))
        return now(device) - start


def calibration_seconds(model: nn.Module, observer: str, batches: list[torch.Tensor], device: torch.device) -> float:
    """Time of ``mq.calibrate`` on ``batches`` of a model prepared for ``qdq`` with ``observer`` on activations."""
    preset = mq.QConfigPreset(f"bench-{observer}", f"{observer} activations", activation_observer=observer)
    qmodel = mq.prepare(model, "qdq", batches[0][:2], qconfig=preset).to(device)
    mq.calibrate(qmodel, batches[:1], progress=False)  # warm-up; the timed call starts from fresh statistics
    start = now(device)
    mq.calibrate(qmodel, batches, progress=False)
    return now(device) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: 3 on cpu, 20 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: 8 on cpu, 64 on cuda)")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/calibration_throughput.md (cpu) or ..._cuda.md (cuda)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    num_batches = args.batches or (20 if cuda else 3)
    batch = args.batch or (64 if cuda else 8)
    if cuda:  # float32 convolutions, as on the CPU (TF32 would change what is measured, and the qparams)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 3, args.size, args.size, generator=gen) for _ in range(num_batches)]
    model = resnet18(num_classes=1000, size=64)
    images = batch * num_batches
    reference = float_seconds(model.to(device), batches, device)
    model.cpu()  # mq.prepare traces the float model on the CPU; the prepared copy is moved to the device
    rows = [["float inference (no observers)", f"{images / reference:.1f}", "1.00x"]]
    for observer in OBSERVERS:
        seconds = calibration_seconds(model, observer, batches, device)
        rows.append([f"mq.calibrate, {observer} activations", f"{images / seconds:.1f}", f"{seconds / reference:.2f}x"])
    gpu = f", GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if cuda else ""
    text = (f"ResNet-18 shape (mq_core.testing.zoo), {args.size}x{args.size}, batch {batch}, {num_batches} batches "
            f"made on the CPU and moved to the device by mq.calibrate; device {device.type}{gpu}; "
            f"{torch.get_num_threads()} CPU threads.\n{machine_line()}\n\n"
            + render_table(["pass", "images/s", "time vs float"], rows) + "\n")
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"calibration_throughput{'_cuda' if cuda else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Calibration throughput\n\n```text\n{text}```\n")


if __name__ == "__main__":
    main()
