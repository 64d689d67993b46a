"""HuggingFace transformers (random weights, tiny configs, no download): BERT, ViT and GPT-2 captured with
torch.export, prepared from tokenizer-style dicts, calibrated at several lengths, exported with dynamic batch and
sequence for every backend and verified (layer-wise check included) at another batch size and length.

Each model and each (model, backend) is prepared and exported once per module: capture and the ONNX export are
what costs here.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import mq_core as mq
from mq_core.export import ExportResult
from mq_core.pipeline.export import export_many
from mq_core.quant.fake_quant import FakeQuantizer

transformers = pytest.importorskip("transformers")

LOG = "mq_core.pipeline.prepare"
BACKENDS = sorted(mq.list_backends())
#: One layer, two heads, width 16: every op kind a full-size model has, at the lowest capture/export/compile cost.
TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
VOCAB = 50


def _tokens(batch: int, length: int, seed: int, mask: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=g)}
    if mask:
        inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        inputs["attention_mask"][0, length - 2:] = 0  # padding: the additive mask holds finfo.min
    return inputs


def _images(batch: int, seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


def _bert() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=16,
                                                          attn_implementation="eager", **TINY))


def _vit() -> nn.Module:
    return transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, attn_implementation="eager",
                                                        **TINY))


def _gpt2() -> nn.Module:
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, use_cache=False,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0))


#: name -> (float model factory, example inputs, calibration batches (other batch sizes and lengths), test inputs)
MODELS: dict[str, tuple[Callable[[], nn.Module], dict, list[dict], dict]] = {
    "bert": (_bert, _tokens(2, 6, 0), [_tokens(4, 5 + i, i) for i in range(2)], _tokens(3, 9, 7)),
    "gpt2": (_gpt2, _tokens(2, 6, 0, mask=False), [_tokens(4, 5 + i, i, mask=False) for i in range(2)],
             _tokens(3, 9, 7, mask=False)),
    "vit": (_vit, _images(2, 0), [_images(4, i + 1) for i in range(2)], _images(3, 7)),
}


class _Prepared:
    """Float models, prepared+calibrated models and exports, each built once per module (``get``/``export``)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.float: dict[str, nn.Module] = {}
        self.qmodels: dict[tuple[str, str], nn.Module] = {}
        self.exports: dict[tuple[str, str], dict[str, ExportResult]] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}

    def model(self, name: str) -> nn.Module:
        if name not in self.float:
            torch.manual_seed(0)
            self.float[name] = MODELS[name][0]().eval()
        return self.float[name]

    def get(self, name: str, backend: str) -> nn.Module:
        if (name, backend) not in self.qmodels:
            _, example, calibration, _ = MODELS[name]
            records: list[logging.LogRecord] = []
            handler = logging.Handler(logging.INFO)
            handler.emit = records.append  # type: ignore[method-assign]
            logger = logging.getLogger(LOG)
            level = logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                qmodel = mq.prepare(self.model(name), backend, example)
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            mq.calibrate(qmodel, calibration, progress=False)
            self.qmodels[name, backend] = qmodel
            self.logs[name, backend] = [r.getMessage() for r in records]
        return self.qmodels[name, backend]

    def export(self, name: str, backend: str) -> dict[str, ExportResult]:
        if (name, backend) not in self.exports:
            self.exports[name, backend] = export_many(self.get(name, backend), MODELS[name][1],
                                                      self.out / f"{name}-{backend}")
        return self.exports[name, backend]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> _Prepared:
    return _Prepared(tmp_path_factory.mktemp("transformers"))


def _cosine(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min())


def _activation_scales(qmodel: nn.Module) -> list[float]:
    return [float(m.scale.max()) for m in qmodel.modules() if isinstance(m, FakeQuantizer) and m.role == "activation"]


def _weight_quantizers(qmodel: nn.Module) -> set[str]:
    return {m.qname for m in qmodel.modules() if isinstance(m, FakeQuantizer) and m.role == "weight"}


def test_bert_falls_back_to_export_with_one_log_line(prepared: _Prepared) -> None:
    qmodel = prepared.get("bert", "qdq")
    fallback = [m for m in prepared.logs["bert", "qdq"] if "torch.export" in m]
    assert len(fallback) == 1 and "torch.fx cannot trace BertModel" in fallback[0]
    assert qmodel.mq_info.capture == "export"
    # q, k, v, attention output, intermediate, output + pooler: every Linear is a module with a weight quantizer; qdq
    # quantizes the word, position and token-type tables too (ONNX Runtime gathers from the dequantized int8 table)
    assert len(_weight_quantizers(qmodel)) == 6 + 1 + 3


@pytest.mark.parametrize(("name", "backend"), [("bert", "qdq"), ("gpt2", "qdq"), ("vit", "tensorrt")])
def test_the_simulation_stays_close_to_float(prepared: _Prepared, name: str, backend: str) -> None:
    qmodel, test = prepared.get(name, backend), MODELS[name][3]
    with torch.no_grad():
        got, ref = qmodel(**test)[0], prepared.model(name)(**test).last_hidden_state
    assert _cosine(got, ref) > 0.98
    assert max(_activation_scales(qmodel)) < 10.0  # additive masks (padding, causal) are never quantized


def test_bert_masked_scores_stay_float(prepared: _Prepared) -> None:
    qmodel = prepared.get("bert", "qdq")
    assert max(_activation_scales(qmodel)) < 1.0  # a quantizer on the masked scores would have a scale of ~1.3e36
    softmax_inputs = [n.args[0] for n in qmodel.graph.nodes if n.op == "call_function" and "softmax" in str(n.target)]
    assert len(softmax_inputs) == 1 and all(n.op == "call_function" for n in softmax_inputs)  # read in float


def test_gpt2_conv1d_projections_are_quantized_as_linear(prepared: _Prepared) -> None:
    qmodel = prepared.get("gpt2", "qdq")
    assert type(prepared.model("gpt2").h[0].attn.c_attn).__name__ == "Conv1D"  # the float model is left as it is
    assert _weight_quantizers(qmodel) == {f"h.0.{p}.weight_fake_quant" for p in
                                          ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {
        "wte.weight_fake_quant", "wpe.weight_fake_quant"}  # the token and position tables (qdq only)
    layer = qmodel.get_submodule("h.0.attn.c_attn")
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (48, 16)  # [out, in]: Conv1D's weight transposed
    assert layer.weight_fake_quant.ch_axis == 0


def test_bert_exports_with_dynamic_batch_and_sequence(prepared: _Prepared) -> None:
    result = prepared.export("bert", "qdq")["qdq"]
    inputs = {i.name: i for i in result.qdq_model.graph.input}
    for name in ("input_ids", "attention_mask"):
        dims = [d.dim_param or d.dim_value for d in inputs[name].type.tensor_type.shape.dim]
        assert dims[1] == "sequence" and isinstance(dims[0], str), dims
        assert inputs[name].type.tensor_type.elem_type == 7  # int64
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(result.out_dir / "model.onnx"))
    out = session.run(None, {k: v.numpy() for k, v in MODELS["bert"][3].items()})
    assert out[0].shape == (3, 9, 16) and np.isfinite(out[0]).all()


def test_bert_embedding_tables_are_int8_rows_gathered_after_dequantize_on_qdq(prepared: _Prepared) -> None:
    result = prepared.export("bert", "qdq")["qdq"]
    graph = result.qdq_model.graph
    tables = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    initializers = {i.name: i for i in graph.initializer}
    for table in tables:
        name = f"embeddings.{table}.weight"
        assert initializers[name].data_type == onnx.TensorProto.INT8, name
        dequantize = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
        assert [a.i for a in dequantize.attribute if a.name == "axis"] == [0]
        assert [n.op_type for n in graph.node if dequantize.output[0] in n.input] == ["Gather"]
    report = mq.verify(result, MODELS["bert"][3], runtimes=["onnxruntime"])
    assert report.passed and report.layers is not None, report.table(layers=True)


def _runtimes(name: str, backend: str, exporter: str) -> list[str]:
    """The backend's runtimes, each on its own backend's artifacts only (the qdq backend lists OpenVINO and TVM
    too); TVM (seconds per compile, three compiles per layer-wise verify) only on BERT's QDQ artifact, the case with
    a dynamic sequence length and a padding mask."""
    declared = [r for r in mq.get_backend(backend).runtimes if r == "onnxruntime" or r == backend]
    return [r for r in declared if r != "tvm" or (name, exporter) == ("bert", "tvm")]


#: Artifacts verification must FAIL: TensorRT's implicit INT8 (the legacy ranges files) has one range per tensor, and
#: a pre-norm ViT block reads the embeddings both quantized (the residual add) and in float (the LayerNorm); the
#: exporter warns that the engine may differ there, and verify must see that it does.
UNFAITHFUL = {("vit", "tensorrt-legacy")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_backend_exports_and_verifies(prepared: _Prepared, name: str, backend: str) -> None:
    exports = prepared.export(name, backend)
    assert set(exports) == set(mq.get_backend(backend).exporters)
    test: dict[str, Any] = MODELS[name][3]  # another batch size and (for text) another length than the example
    for exporter, result in exports.items():
        report = mq.verify(result, test, runtimes=_runtimes(name, backend, exporter))
        assert report.checks and not [s for s in report.skipped if "not installed" in s], report.skipped
        assert report.layers is not None and report.layers.checks, exporter
        if (name, exporter) in UNFAITHFUL:
            assert not report.passed and report.layers.first_broken(), report.table(layers=True)
        else:
            assert report.passed, f"{exporter}:\n{report.table(layers=True)}"


@pytest.mark.slow
def test_real_minilm_sentence_embeddings_survive_w8a8(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2's real weights (registry package, read offline), qdq W8A8 with the defaults, held-out
    sentences: the issue's target, cosine >= 0.99 with the float embedding (benchmarks/results/
    transformers_accuracy.md: 0.9934 mean, 0.9905 min; 0.87 when LayerNorm/GELU inputs and the residual stream were
    quantized too), every sentence still retrieves its own float embedding, and the export verifies in ONNX
    Runtime (layer-wise check included) on held-out sentences."""
    from mq_core.testing import minilm

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip(f"the real weights need {minilm.PACKAGE}")
    model = minilm.load_model()
    tokens = minilm.tokenize(minilm.CALIBRATION)
    example = {k: v[:2] for k, v in tokens.items()}
    qmodel = mq.prepare(model, "qdq", example)
    assert qmodel.mq_info.capture == "export"
    mq.calibrate(qmodel, [{k: v[i:i + 10] for k, v in tokens.items()} for i in range(0, 30, 10)], progress=False)
    held_out = minilm.tokenize(minilm.HELD_OUT)
    got, ref = minilm.embed(qmodel, held_out), minilm.embed(model, held_out)
    cosine = nn.functional.cosine_similarity(got, ref)
    assert float(cosine.mean()) >= 0.99 and float(cosine.min()) > 0.985, cosine
    similarity = nn.functional.normalize(got, dim=1) @ nn.functional.normalize(ref, dim=1).T
    assert similarity.argmax(1).tolist() == list(range(len(minilm.HELD_OUT)))
    assert max(_activation_scales(qmodel)) < 10.0  # a quantizer over the finfo.min padding mask: ~1e36
    verified_on = {k: v[:10] for k, v in held_out.items()}  # the layer-wise check runs the artifact three times
    report = mq.verify(mq.export(qmodel, example, tmp_path / "qdq"), verified_on, runtimes=["onnxruntime"])
    assert report.passed, report.table(layers=True)
