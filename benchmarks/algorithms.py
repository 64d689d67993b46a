"""Benchmark of the PTQ methods on the digits demo: accuracy and wall time per method and bit width.

    python benchmarks/algorithms.py                   # the defaults: 3 seeds, config default iterations
    python benchmarks/algorithms.py --iterations 300  # a quicker, documented deviation

For every seed, the digits CNN and residual net are trained with that seed (cached in MQ_CACHE_DIR), prepared for
the ``qdq`` backend at each bit width and calibrated on 256 training images:

* ``nearest/minmax``: min/max observers (weights per channel, activations per tensor), nearest rounding;
* ``nearest/mse``: MSE range search for weights and activations (the core presets), nearest rounding;
* ``adaround``, ``brecq``, ``qdrop``: each starts from the ``nearest/mse`` model (the papers initialise the
  weight grid with an MSE search) and runs with its config defaults (``iterations`` aside, when given) and
  ``seed`` = the seed.

Accuracy is top-1 on the held-out test split (450 images), reported as mean +- std over the seeds; time is the
wall time of calibration plus the method. At 4 bits and more the accuracy of these small models saturates (a few
test images apart), so the file also reports the *logit error*: the squared L2 distance between the quantized and
the float model's logits, averaged over the test images, which shows whether a method brings the model closer to
the float one where accuracy cannot tell. The ordering qdrop >= brecq >= adaround > nearest/mse is checked on the
mean accuracies (and, separately, on the mean logit errors) and every violation is listed in the results file.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

import mq_core as mq
from mq_core.demo import digits

log = logging.getLogger("benchmarks.algorithms")

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
BASELINES = ("nearest/minmax", "nearest/mse")
METHODS = ("adaround", "brecq", "qdrop")
ROWS = (*BASELINES, *METHODS)
ARCHS = {"cnn": "DigitsCNN", "resnet": "DigitsResNet"}
CALIBRATION = dict(num_batches=8, batch_size=32)
DEFAULT_OUT = Path(__file__).parent / "results" / "algorithms.md"


def _mean_std(values: list[float], fmt: str = ".2f") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{fmt}} ± {std:{fmt}}"


@dataclass
class Cell:
    accuracy: list[float] = field(default_factory=list)
    logit_error: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def mean(self, metric: str = "accuracy") -> float:
        return statistics.fmean(getattr(self, metric))

    def text(self) -> str:
        return f"{_mean_std(self.accuracy)} ({statistics.fmean(self.seconds):.1f} s)"


def logit_error(qmodel: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Squared L2 distance to the float model's logits, averaged over images."""
    with torch.no_grad():
        return float((qmodel.eval()(x) - reference).pow(2).sum(1).mean())


def _preset(bits: str, observer: str) -> mq.QConfigPreset:
    w, a = BITS[bits]
    return mq.QConfigPreset(f"{bits.lower()}-{observer}", f"{bits}, {observer} observers, nearest rounding",
                            weight_bits=w, activation_bits=a, weight_observer=observer, activation_observer=observer)


def _calibrated(model: nn.Module, calib: list[torch.Tensor], preset: mq.QConfigPreset) -> nn.Module:
    qmodel = mq.prepare(model, "qdq", (calib[0][:2],), preset)
    mq.calibrate(qmodel, calib, progress=False)
    return qmodel


def run(seeds: int, iterations: int | None, archs: list[str], bits_list: list[str], epochs: int
        ) -> tuple[dict[tuple[str, str, str], Cell], dict[str, Cell]]:
    """Every (arch, bits, row) cell over all seeds, and the float accuracy per arch."""
    data = digits.load_digits()
    calib = data.calibration_batches(**CALIBRATION)
    cells: dict[tuple[str, str, str], Cell] = {}
    fp: dict[str, Cell] = {arch: Cell() for arch in archs}
    overrides = {} if iterations is None else {"iterations": iterations}
    for seed in range(seeds):
        for arch in archs:
            model = digits.pretrained(arch, seed=seed, epochs=epochs)
            fp[arch].accuracy.append(digits.accuracy(model, data.x_test, data.y_test))
            with torch.no_grad():
                reference = model.eval()(data.x_test)
            for bits in bits_list:
                mse_model = None
                for row in ROWS:
                    start = time.perf_counter()
                    if row in BASELINES:
                        qmodel = _calibrated(model, calib, _preset(bits, row.split("/")[1]))
                        if row == "nearest/mse":
                            mse_model, calibration_time = qmodel, time.perf_counter() - start
                    else:
                        qmodel = copy.deepcopy(mse_model)
                        mq.ptq(qmodel, row, calib, progress=False, seed=seed, **overrides)
                    elapsed = time.perf_counter() - start + (calibration_time if row in METHODS else 0.0)
                    accuracy = digits.accuracy(qmodel, data.x_test, data.y_test)
                    error = logit_error(qmodel, data.x_test, reference)
                    cell = cells.setdefault((arch, bits, row), Cell())
                    cell.accuracy.append(accuracy)
                    cell.logit_error.append(error)
                    cell.seconds.append(elapsed)
                    log.info("seed %d %-6s %s %-14s %6.2f%%  logit error %8.3f  %6.1f s", seed, arch, bits, row,
                             accuracy, error, elapsed)
    return cells, fp


def ordering_violations(cells: dict[tuple[str, str, str], Cell], archs: list[str], bits_list: list[str],
                        metric: str = "accuracy") -> list[str]:
    """Where qdrop >= brecq >= adaround > nearest/mse does not hold on the means of ``metric`` (for the logit
    error, lower is better, so the comparisons flip)."""
    found = []
    sign = 1.0 if metric == "accuracy" else -1.0
    for arch in archs:
        for bits in bits_list:
            mean = {row: cells[arch, bits, row].mean(metric) for row in ROWS}
            pairs = [("qdrop", "brecq", False), ("brecq", "adaround", False), ("adaround", "nearest/mse", True)]
            for better, worse, strict in pairs:
                a, b = sign * mean[better], sign * mean[worse]
                if not (a > b if strict else a >= b):
                    op = (">" if strict else ">=") if metric == "accuracy" else ("<" if strict else "<=")
                    found.append(f"{ARCHS[arch]} {bits}: {better} {mean[better]:.4g} is not {op} {worse} "
                                 f"{mean[worse]:.4g}")
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- platform: {platform.platform()}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable by this process), "
        f"torch threads: {torch.get_num_threads()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, mq-core {version('mq-core')}, "
        f"mq-algos {version('mq-algos')}",
    ]


def report(cells: dict[tuple[str, str, str], Cell], fp: dict[str, Cell], args: argparse.Namespace,
           wall: float) -> str:
    iterations = args.iterations or mq.get_ptq_method("adaround").Config().iterations
    lines = [
        "# PTQ methods on the digits demo",
        "",
        f"Generated by `python benchmarks/algorithms.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"in {wall / 60:.1f} min.",
        "",
        *machine(),
        "",
        f"Setup: `qdq` backend, {args.seeds} seeds (model training seed = method seed), models trained "
        f"{args.epochs} epochs, calibration on {CALIBRATION['num_batches'] * CALIBRATION['batch_size']} training "
        f"images, {iterations} iterations per unit for the methods (all other options at their defaults), "
        "top-1 accuracy (%) on the 450-image test split as mean ± std over seeds, "
        "with the mean wall time (calibration + method) in brackets. The methods start from the `nearest/mse` "
        "model (same qparams; they change the weight rounding and, for brecq/qdrop, the activation scales).",
        "",
    ]
    header = ["| method | " + " | ".join(args.bits) + " |", "|---|" + "---|" * len(args.bits)]
    for arch in fp:
        lines += [f"## {ARCHS[arch]} (float accuracy: {_mean_std(fp[arch].accuracy)})", "",
                  "Top-1 accuracy (%), mean ± std over seeds (mean wall time):", "", *header]
        lines += [f"| {row} | " + " | ".join(cells[arch, bits, row].text() for bits in args.bits) + " |"
                  for row in ROWS]
        lines += ["", "Logit error to the float model (lower is better), mean ± std over seeds:", "", *header]
        lines += [f"| {row} | " + " | ".join(_mean_std(cells[arch, bits, row].logit_error, ".3g") for bits in args.bits)
                  + " |" for row in ROWS]
        lines.append("")
    for metric, title in (("accuracy", "accuracy"), ("logit_error", "logit error")):
        violations = ordering_violations(cells, list(fp), args.bits, metric)
        lines += [f"## Ordering qdrop >= brecq >= adaround > nearest/mse on the mean {title}", ""]
        if violations:
            lines += ["The expected ordering does **not** hold everywhere:", ""]
            lines += [f"- {v}" for v in violations]
        else:
            lines.append("Holds for every model and bit width.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per unit (default: each method's config default)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of the digits models")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    for noisy in ("mq_core", "mq_algos"):  # per-call and per-unit messages; turn them on to look inside
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cells, fp = run(args.seeds, args.iterations, args.archs, args.bits, args.epochs)
    text = report(cells, fp, args, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log.info("\n%s\nwritten to %s", text, args.out)


if __name__ == "__main__":
    main()
