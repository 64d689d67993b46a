"""Distributed quantization-aware training (QAT) with torchrun: the digits CNN at 4 bits under DistributedDataParallel.

In the style of the PyTorch ImageNet example: one script that runs as N processes under ``torchrun`` (gloo on CPUs,
NCCL with one GPU per process) or as one plain process, with a DistributedSampler, checkpoints every epoch and
``--resume``. The steps:

    1. join the process group torchrun set up (none when run as a plain process)
    2. prepare the float model for QAT on every rank (the same model everywhere)
    3. calibrate on each rank's shard of the calibration images; the observers' statistics are merged across the
       ranks, so every rank starts from the same qparams (those of one process on all the images)
    4. wrap in DistributedDataParallel and train with the LSQ preset (learned step sizes, mq-algos): each rank
       trains on its shard of every epoch, gradients (step sizes included) are averaged
    5. rank 0 writes a checkpoint after every epoch (atomically: a crash leaves the previous one); ``--resume``
       restores it on every rank, with the optimizer state, and continues from the next epoch
    6. rank 0 exports the final model, verifies the artifact in a real runtime and evaluates it

    torchrun --nproc_per_node 2 examples/qat_ddp.py --epochs 3
    torchrun --nproc_per_node 2 examples/qat_ddp.py --epochs 5 --resume mq-out/qat_ddp/checkpoint.pt
    python examples/qat_ddp.py --epochs 3                    # the same, in one process

``--batch-size`` is the global batch: each of N processes takes 1/N of it, so N processes take the steps one
process would take on the whole batch (LSQ's gradient scale counts the global batch). Exit status: 0 when the
deployed artifact agrees with the simulation, 1 when verification fails, 2 on bad options.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import mq_core as mq
from mq_core.demo.digits import ARCHITECTURES, load_digits, pretrained

CALIBRATION_IMAGES = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", choices=sorted(ARCHITECTURES), help="digits model (default: cnn)")
    parser.add_argument("--backend", default="qdq", help="target backend; it must run 4-bit grids (default: qdq)")
    parser.add_argument("--preset", default="w4a4-lsq",
                        help="qconfig preset (default: w4a4-lsq, learned step sizes from mq-algos; w4a4-pact, w4a4)")
    parser.add_argument("--epochs", type=int, default=5, help="total QAT epochs, counting resumed ones (default: 5)")
    parser.add_argument("--max-steps", type=int, help="stop each epoch after this many steps (a quick check)")
    parser.add_argument("--freeze-bn-epoch", type=int, default=3,
                        help="freeze BatchNorm statistics from this epoch on (default: 3; >= --epochs: never)")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default: 5e-4)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch size, split evenly across the processes (default: 64)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffling (default: 0)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint this script wrote")
    parser.add_argument("--out", default="mq-out/qat_ddp", help="output folder (default: %(default)s)")
    parser.add_argument("--runtime", action="append", metavar="NAME",
                        help="verify with this runtime (repeatable; default: every runtime the backend declares)")
    parser.add_argument("--verify-samples", type=int, default=128,
                        help="held-out images compared with the simulation (default: 128)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (rank, world size, this process's device); one process without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def plain_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state dict with string keys, as a checkpoint stores it (plain data, weights_only loading)."""
    return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def optimizer_state(plain: dict[str, Any]) -> dict[str, Any]:
    return {"state": {int(k): v for k, v in plain["state"].items()}, "param_groups": plain["param_groups"]}


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, args: argparse.Namespace) -> None:
    """Cosine decay from ``--lr`` over ``--epochs``, a function of the epoch alone: a resumed run (even one given
    more epochs) continues the schedule without restoring any scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
             device: torch.device) -> float:
    """Top-1 accuracy in percent on all of ``x``: each rank scores every world-th image, the counts are summed."""
    model.eval()
    with torch.no_grad():
        correct = (model(x[rank::world].to(device)).argmax(1) == y[rank::world].to(device)).sum()
    counts = torch.stack([correct, torch.tensor(len(x[rank::world]), device=device)])
    if world > 1:
        dist.all_reduce(counts)
    return 100.0 * float(counts[0]) / float(counts[1])


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, max_steps: int | None) -> float:
    """One pass over this rank's shard; the loss averaged over its batches."""
    model.train()
    total, steps = 0.0, 0
    for x, y in loader:
        if max_steps is not None and steps == max_steps:
            break
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients across the ranks here
        optimizer.step()
        total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Bad options fail on every rank at once, before any process group or work.
    backend = mq.get_backend(args.backend)
    qconfig = mq.resolve_qconfig(backend, args.preset)
    if args.batch_size < 1 or args.epochs < 1:
        raise mq.ConfigError("--batch-size and --epochs must be at least 1.")
    resume = mq.load_checkpoint(args.resume) if args.resume else None
    rank, world, device = setup()
    try:
        return run(args, backend, qconfig, resume, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args: argparse.Namespace, backend: mq.Backend, qconfig: mq.QConfig, resume: dict[str, Any] | None,
        rank: int, world: int, device: torch.device) -> int:
    if args.batch_size % world:
        raise mq.ConfigError(f"--batch-size {args.batch_size} does not split evenly across {world} processes.")
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    say = print if rank == 0 and not args.quiet else (lambda *_a, **_k: None)

    # 1. Data: every rank reads the same (small) data set; the samplers give each its shard.
    data = load_digits()
    train = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.workers)
    example = data.x_train[:args.batch_size // world]

    # 2. The float model: rank 0 trains it once into the cache while the others wait, then everyone loads it.
    if rank == 0:
        model = pretrained(args.arch)
    if world > 1:
        dist.barrier()
    if rank != 0:
        model = pretrained(args.arch)

    if resume is None:
        # 3. Prepare for QAT and calibrate on this rank's shard: the statistics are merged across the ranks, so
        #    every rank freezes the same qparams (mq.calibrate syncs by default under a process group).
        qmodel = mq.prepare(model, backend, (example,), qconfig=qconfig, mode="qat").to(device)
        calibration = TensorDataset(data.x_train[:CALIBRATION_IMAGES])
        mq.calibrate(qmodel, DataLoader(calibration, batch_size=32,
                                        sampler=DistributedSampler(calibration, world, rank, shuffle=False)),
                     progress=False)
        start = 0
    else:
        # 3'. Resume: every rank restores the checkpoint rank 0 wrote (qparams and learned step sizes included).
        qmodel = mq.restore(model, resume).to(device)
        start = int(resume["extra"]["epoch"])
    calibrated_acc = evaluate(qmodel, data.x_test, data.y_test, rank, world, device)

    # 4. DDP and the optimizer, over the parameters in a fixed (name) order, so a resumed optimizer state lines up.
    if world == 1:
        ddp = qmodel
    else:
        ddp = DistributedDataParallel(qmodel, device_ids=[device] if device.type == "cuda" else None)
    named = sorted(qmodel.named_parameters())
    optimizer = torch.optim.Adam([p for _, p in named], lr=args.lr)
    if resume is not None:
        optimizer.load_state_dict(optimizer_state(resume["extra"]["optimizer"]))
    if start:
        say(f"resumed from {args.resume} after epoch {start}", file=sys.stderr)
    for epoch in range(start, args.epochs):
        adjust_learning_rate(optimizer, epoch, args)
        if epoch >= args.freeze_bn_epoch:  # again after a resume: the frozen flag is not part of the state
            mq.freeze_bn(qmodel)
        sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        loss = train_one_epoch(ddp, loader, optimizer, device, args.max_steps)
        if world > 1:
            # BatchNorm running statistics are buffers each rank updates from its own shard; DDP copies rank 0's
            # at the start of every forward, so after the last step they differ. Take rank 0's now, so that every
            # rank evaluates (and rank 0 saves) one model. (SyncBatchNorm on GPUs: see docs/algorithms.md.)
            for buffer in qmodel.buffers():
                dist.broadcast(buffer, 0)
        accuracy = evaluate(qmodel, data.x_test, data.y_test, rank, world, device)
        # 5. Rank 0 writes the checkpoint (atomically); the others wait, so a resume always finds a whole one.
        if rank == 0:
            mq.save_checkpoint(qmodel, checkpoint, (example,),
                               extra={"epoch": epoch + 1, "optimizer": plain_optimizer_state(optimizer.state_dict())})
        if world > 1:
            dist.barrier()
        say(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, test accuracy {accuracy:.2f}%", file=sys.stderr)
    qat_acc = evaluate(qmodel, data.x_test, data.y_test, rank, world, device)
    if rank != 0:
        return 0

    # 6. Rank 0: export (BN folded with the final statistics, learned qparams frozen), verify, evaluate.
    qmodel.cpu().eval()
    result = mq.export(qmodel, (example,), out / backend.name)
    verify_inputs = data.x_test[:args.verify_samples]
    report = mq.verify(result, (verify_inputs,), runtimes=args.runtime)
    check = report.checks[0]
    deployed = mq.RuntimeModule(result, check.runtime, artifact=check.artifact)
    deployed_acc = evaluate(deployed, data.x_test, data.y_test, 0, 1, torch.device("cpu"))
    print(f"distributed QAT of the digits {args.arch} for backend {backend.name!r}")
    print(f"processes: {world} ({dist.get_backend() if world > 1 else 'no process group'}, {device.type})")
    print(f"qconfig: {qconfig.name} (weights {qconfig.weight.scheme.describe()} {qconfig.weight.fake_quantizer}, "
          f"activations {qconfig.activation.scheme.describe()} {qconfig.activation.fake_quantizer})")
    resumed = f" (resumed after epoch {start})" if start else ""
    print(f"training: epochs {start + 1}-{args.epochs}{resumed}" if start < args.epochs
          else f"training: none (the checkpoint holds all {args.epochs} epochs)")
    print(f"{'restored' if start else 'calibrated'} accuracy: {calibrated_acc:.2f}% (before training)")
    print(f"simulated accuracy: {qat_acc:.2f}% (after training)")
    print(f"deployed accuracy: {deployed_acc:.2f}% ({check.artifact} artifact in {check.runtime})")
    print(f"verification: {'PASS' if report.passed else 'FAIL'} (worst {report.worst_steps:.3g} steps over "
          f"{len(verify_inputs)} images; runtimes {', '.join(sorted({c.runtime for c in report.checks}))})")
    for note in report.notes:
        print(f"note: {note}")
    print(f"checkpoint: {checkpoint}")
    for a in result.artifacts:
        print(f"artifact: {a.kind:<18} {a.path}")
    if not report.passed:
        print(report.table())
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except mq.MQError as exc:  # bad options and unusable models: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
