"""Post-training quantization (PTQ) of a small CNN, end to end, in plain Python.

The model is mq's built-in demo: a three-layer CNN trained on scikit-learn's bundled 8x8 digits (no download;
trained once, then cached in ``$MQ_CACHE_DIR`` or ``~/.cache/mq``). The script walks the whole deploy path:

    1. load data and the float model           4. (optional) a PTQ algorithm such as AdaRound
    2. prepare it for a target backend          5. export exactly the files the target consumes
    3. calibrate on a few training batches      6. verify those files in a real runtime, evaluate, summarise

Run it from the repository root::

    python examples/ptq_digits.py                              # generic QDQ ONNX for ONNX Runtime
    python examples/ptq_digits.py --backend tensorrt           # any installed backend (`mq backends`)
    python examples/ptq_digits.py --qconfig w4a4-adaround --method adaround \\
        --method-option iterations=200                         # 4-bit, with mq-algos installed

Exit status: 0 when the deployed artifacts agree with the simulation, 1 when verification fails, 2 on bad
options (an unknown backend, a preset the backend cannot run, ...).
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import mq_core as mq
from mq_core.demo.digits import accuracy, load_digits, pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="qdq", help="target backend (default: qdq; see `mq backends`)")
    parser.add_argument("--qconfig", help="qconfig preset, e.g. w8a8, reduce-range, w4a4-adaround (default: the "
                                          "backend's own 8-bit grids)")
    parser.add_argument("--method", help="PTQ algorithm after calibration: adaround, brecq, qdrop (needs mq-algos)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of --method, e.g. iterations=200 (repeatable)")
    parser.add_argument("--out", default="mq-out/ptq_digits", help="output folder (default: %(default)s)")
    parser.add_argument("--runtime", action="append", metavar="NAME",
                        help="verify with this runtime (repeatable; default: every runtime the backend declares; "
                             "see `mq plugins`, e.g. openvino-int8 for this CPU's int8 kernels)")
    parser.add_argument("--verify-samples", type=int, default=128,
                        help="held-out images compared element by element with the simulation (default: 128)")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 32 (default: 8)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["iterations=200", "lr=1e-3"]`` -> ``{"iterations": 200, "lr": 0.001}`` (Python literals, else strings)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise mq.ConfigError(f"--method-option expects KEY=VALUE, got {pair!r}.")
        try:
            options[key.replace("-", "_")] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key.replace("-", "_")] = text
    return options


def deployed_accuracy(result: mq.ExportResult, report: mq.VerificationReport, x: torch.Tensor,
                      y: torch.Tensor) -> tuple[float, str, str]:
    """Accuracy of the exported artifact itself, run by the first runtime that verified it.

    ``mq.RuntimeModule`` runs an artifact the way its exporter says its files run: for a QDQ ONNX the file as
    written; for a ranges-file target (SNPE encodings, Tengine scale table, ...) the float ONNX with Q/DQ rebuilt
    from the file *as written*. It is callable like a torch model, so the same accuracy function measures the
    float model, the simulation and the deployed artifact.
    """
    check = report.checks[0]
    deployed = mq.RuntimeModule(result, check.runtime, artifact=check.artifact)
    return accuracy(deployed, x, y), check.artifact, check.runtime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    out = Path(args.out)

    # 0. Resolve the target and its qconfig first, so a typo or a preset the target cannot run (TensorRT and
    #    4 bits) fails at once, with the list of what is installed, before any work is done.
    backend = mq.get_backend(args.backend)
    qconfig = mq.resolve_qconfig(backend, args.qconfig)

    # 1. Data and the float model. Calibration uses training images only; accuracy is measured on the held-out
    #    test split, so nothing the quantizer saw is used to judge it.
    data = load_digits()
    model = pretrained("cnn", progress=progress)
    float_acc = accuracy(model, data.x_test, data.y_test)
    calib = data.calibration_batches(num_batches=args.calib_batches)
    example = calib[0]  # any batch with the right shape: used for tracing and for the exported graph's inputs

    # 2. Prepare: trace the model, fold BatchNorm into the convolutions (PTQ mode), give every weight a fake
    #    quantizer, and place activation quantizers where *this backend* quantizes (TensorRT: inputs of convs
    #    and adds; ONNX Runtime / SNPE / TVM: every layer output). The float model is left untouched.
    qmodel = mq.prepare(model, backend, (example,), qconfig=qconfig)

    # 3. Calibrate: observers record the ranges of weights and activations on a few batches; then the scales
    #    and zero points are frozen and fake quantization is switched on. From here on the PyTorch model
    #    computes what the target's integer arithmetic will compute.
    mq.calibrate(qmodel, calib, progress=progress)

    # 4. Optional: a PTQ algorithm (AdaRound, BRECQ, QDrop from mq-algos) re-optimises weight rounding and
    #    qparams on the same calibration data; it matters at 4 bits, much less at 8.
    if args.method:
        mq.ptq(qmodel, args.method, calib, progress=progress, **parse_options(args.method_option))
    sim_acc = accuracy(qmodel, data.x_test, data.y_test)

    # 5. Export: the backend's default exporter writes its artifacts (a QDQ ONNX, or a float ONNX plus a ranges
    #    file, ...) and a manifest with checksums, atomically (all files or none). A checkpoint of the prepared
    #    model lets you resume later (mq.load_checkpoint + mq.restore) without calibrating again.
    result = mq.export(qmodel, (example,), out / backend.name)
    checkpoint = mq.save_checkpoint(qmodel, out / backend.name / "qmodel.pt", (example,),
                                    model_ref="mq_core.demo.digits:DigitsCNN")

    # 6. Verify: run the artifacts in real runtimes (ONNX Runtime, OpenVINO, TVM: whichever the backend names)
    #    on held-out images and compare every output element with the simulation, in quantization steps. Then
    #    measure the accuracy of the deployed artifact itself on the whole test split.
    verify_inputs = data.x_test[:args.verify_samples]
    report = mq.verify(result, (verify_inputs,), runtimes=args.runtime)
    deployed_acc, artifact, runtime = deployed_accuracy(result, report, data.x_test, data.y_test)

    runtimes = sorted({c.runtime for c in report.checks})
    print(f"PTQ of the digits CNN for backend {backend.name!r}")
    print(f"qconfig: {qconfig.name} (weights {qconfig.weight.scheme.describe()}, activations "
          f"{qconfig.activation.scheme.describe()})" + (f" + {args.method}" if args.method else ""))
    print(f"float accuracy: {float_acc:.2f}%")
    print(f"simulated accuracy: {sim_acc:.2f}%")
    print(f"deployed accuracy: {deployed_acc:.2f}% ({artifact} artifact in {runtime})")
    print(f"verification: {'PASS' if report.passed else 'FAIL'} (worst {report.worst_steps:.3g} steps over "
          f"{len(verify_inputs)} images; runtimes {', '.join(runtimes)})")
    for note in report.notes:  # what a runtime wants you to know, e.g. that it could not use its int8 kernels
        print(f"note: {note}")
    for a in result.artifacts:
        print(f"artifact: {a.kind:<18} {a.path}")
    print(f"checkpoint: {checkpoint}")
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
