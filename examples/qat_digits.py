"""Quantization-aware training (QAT) of the digits CNN at 4 bits, end to end, in plain Python.

At 8 bits calibration alone keeps a model's accuracy (see ``ptq_digits.py``); at 4-bit weights *and* activations
it usually does not, and training the model with the quantizers in the loop wins the accuracy back. The script:

    1. load data and the float model (mq's demo CNN or residual net, trained once and cached)
    2. prepare it for QAT: BatchNorm is kept (its folding into the conv weights is simulated while training)
    3. calibrate, so the quantizers start from sensible ranges
    4. train a few epochs, freezing BatchNorm statistics for the last ones
    5. export, verify the artifact in a real runtime, evaluate it, summarise

Quantizers: the default preset ``w4a4-lsq`` (mq-algos) *learns* each quantizer's step size with the weights
(LSQ, Esser et al. 2020). ``--qconfig w4a4`` trains with fixed quantizers instead: step sizes stay as calibrated
(MSE range search) and only the weights learn, through the straight-through estimator.

    python examples/qat_digits.py                           # W4A4 LSQ, 5 epochs, generic QDQ ONNX
    python examples/qat_digits.py --qconfig w4a4 --arch resnet
    python examples/qat_digits.py --epochs 2 --freeze-bn-epoch 1 --runtime onnxruntime   # a quick check

Exit status: 0 when the deployed artifact agrees with the simulation, 1 when verification fails, 2 on bad options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import mq_core as mq
from mq_core.demo.digits import ARCHITECTURES, accuracy, load_digits, pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", choices=sorted(ARCHITECTURES), help="digits model (default: cnn)")
    parser.add_argument("--backend", default="qdq", help="target backend; it must run 4-bit grids (default: qdq)")
    parser.add_argument("--qconfig", default="w4a4-lsq",
                        help="qconfig preset: w4a4-lsq (learned step sizes, needs mq-algos; the default), w4a4 "
                             "(fixed quantizers), w4a4-pact, ...")
    parser.add_argument("--epochs", type=int, default=5, help="QAT epochs (default: 5)")
    parser.add_argument("--freeze-bn-epoch", type=int, default=3,
                        help="freeze BatchNorm statistics after this many epochs (default: 3; >= --epochs: never)")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default: 5e-4)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training order (default: 0)")
    parser.add_argument("--out", default="mq-out/qat_digits", help="output folder (default: %(default)s)")
    parser.add_argument("--runtime", action="append", metavar="NAME",
                        help="verify with this runtime (repeatable; default: every runtime the backend declares; "
                             "see `mq plugins`, e.g. openvino-int8 for this CPU's int8 kernels)")
    parser.add_argument("--verify-samples", type=int, default=128,
                        help="held-out images compared element by element with the simulation (default: 128)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def train_one_epoch(qmodel: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One pass of plain cross-entropy training; the fake quantizers are part of the forward (and backward)."""
    qmodel.train()
    total = 0.0
    for xb, yb in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(qmodel(xb), yb)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(xb)
    return total / sum(len(xb) for xb, _ in batches)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)

    # 0. Resolve the target and its qconfig first: a typo, a missing plugin (w4a4-lsq comes from mq-algos) or a
    #    target that cannot run 4 bits (TensorRT) fails at once, before any work is done.
    backend = mq.get_backend(args.backend)
    qconfig = mq.resolve_qconfig(backend, args.qconfig)

    # 1. Data and the float model; accuracy is always measured on the held-out test split.
    data = load_digits()
    model = pretrained(args.arch, progress=not args.quiet)
    float_acc = accuracy(model, data.x_test, data.y_test)
    example = data.x_train[:args.batch_size]

    # 2. Prepare for QAT. In "qat" mode conv+BN pairs become one QAT module that keeps the BatchNorm and folds it
    #    into the weight before the weight's fake quantizer, so training sees the weights the target will run.
    qmodel = mq.prepare(model, backend, (example,), qconfig=qconfig, mode="qat")

    # 3. Calibrate before training: observers set every quantizer's initial range (for LSQ, its initial step
    #    size). Starting QAT from uncalibrated quantizers wastes epochs, or diverges.
    mq.calibrate(qmodel, data.calibration_batches(), progress=not args.quiet)
    calibrated_acc = accuracy(qmodel, data.x_test, data.y_test)

    # 4. Train. The optimizer is created *after* calibration: calibration may replace quantizer parameters (a
    #    per-channel LSQ step size is a scalar until calibration installs one parameter per channel), and an
    #    optimizer made earlier would hold the old tensors and never train the new ones. A small learning rate
    #    fine-tunes the float solution rather than starting over.
    torch.manual_seed(args.seed)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.epochs, 1))
    for epoch in range(args.epochs):
        if epoch == args.freeze_bn_epoch:
            # From here BatchNorm uses (and stops updating) its running statistics, exactly as the exported model
            # does once BN is folded: the last epochs train the weights the deployed model will actually have.
            mq.freeze_bn(qmodel)
        batches = list(data.train_batches(batch_size=args.batch_size, seed=args.seed + epoch))
        loss = train_one_epoch(qmodel, optimizer, batches)
        schedule.step()
        if not args.quiet:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, test accuracy "
                  f"{accuracy(qmodel, data.x_test, data.y_test):.2f}%", file=sys.stderr)
    qat_acc = accuracy(qmodel, data.x_test, data.y_test)

    # 5. Export (the deploy view folds BN with the final statistics and freezes the learned qparams), verify the
    #    artifact in real runtimes against the simulation, and evaluate the artifact itself.
    result = mq.export(qmodel, (example,), out / backend.name)
    verify_inputs = data.x_test[:args.verify_samples]
    report = mq.verify(result, (verify_inputs,), runtimes=args.runtime)
    check = report.checks[0]
    deployed = mq.RuntimeModule(result, check.runtime, artifact=check.artifact)
    deployed_acc = accuracy(deployed, data.x_test, data.y_test)

    print(f"QAT of the digits {args.arch} for backend {backend.name!r}")
    print(f"qconfig: {qconfig.name} (weights {qconfig.weight.scheme.describe()} {qconfig.weight.fake_quantizer}, "
          f"activations {qconfig.activation.scheme.describe()} {qconfig.activation.fake_quantizer})")
    frozen = f"after epoch {args.freeze_bn_epoch}" if args.freeze_bn_epoch < args.epochs else "never"
    print(f"training: {args.epochs} epoch(s), BatchNorm frozen {frozen}")
    print(f"float accuracy: {float_acc:.2f}%")
    print(f"calibrated accuracy: {calibrated_acc:.2f}% (before training)")
    print(f"simulated accuracy: {qat_acc:.2f}% (after training)")
    print(f"deployed accuracy: {deployed_acc:.2f}% ({check.artifact} artifact in {check.runtime})")
    print(f"verification: {'PASS' if report.passed else 'FAIL'} (worst {report.worst_steps:.3g} steps over "
          f"{len(verify_inputs)} images; runtimes {', '.join(sorted({c.runtime for c in report.checks}))})")
    for note in report.notes:  # what a runtime wants you to know, e.g. that it could not use its int8 kernels
        print(f"note: {note}")
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
