"""The torch.export capture front-end: the same graph shape as fx (so the same placement), the auto fallback,
dynamic dimensions, dict inputs, the masked-score rule and nn.MultiheadAttention (no transformers needed)."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import mq_core as mq
from mq_core.checkpoint import inputs_from_specs
from mq_core.pipeline.prepare import as_inputs
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.testing.backends import backend_or_skip
from mq_core.testing.zoo import ZOO

PREPARE_LOG = "mq_core.pipeline.prepare"


def _shape_of_placement(qmodel: nn.Module) -> Counter[tuple[str, str, bool]]:
    """The placement without node names (fx and ATen nodes are named differently): reason, consumers, sign."""
    return Counter((r["reason"], "all" if r["consumers"] == "all" else str(len(r["consumers"])), r["unsigned"])
                   for r in qmodel.mq_info.placements[""])


def _weights(qmodel: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name, m in qmodel.named_modules()
            if isinstance(m, FakeQuantizer) and m.role == "weight"}


#: Each zoo model once, on a backend of each placement style (input: tensorrt, openvino; output: qdq).
ZOO_CASES = [("mlp_bn", "tensorrt"), ("mobilenet", "tensorrt"), ("attention", "tensorrt"), ("resnet", "qdq"),
             ("unet", "openvino")]


def test_the_cases_cover_the_zoo() -> None:
    assert {name for name, _ in ZOO_CASES} == set(ZOO)


@pytest.mark.parametrize(("name", "backend"), ZOO_CASES)
def test_zoo_gives_the_same_placement_on_both_front_ends(name: str, backend: str) -> None:
    backend_or_skip(backend)
    entry = ZOO[name]
    model, x = entry.build().eval(), entry.inputs(2)
    by_fx = mq.prepare(model, backend, (x,), capture="fx")
    by_export = mq.prepare(model, backend, (x,), capture="export")
    assert isinstance(by_export, fx.GraphModule)
    assert by_export.mq_info.capture == "export" and by_fx.mq_info.capture == "fx"
    assert _shape_of_placement(by_export) == _shape_of_placement(by_fx)
    assert _weights(by_export) == _weights(by_fx)  # Conv/Linear (BN folded) are modules again, with weight quantizers
    assert not any(n.op == "get_attr" and n.target.endswith(".weight") for n in by_export.graph.nodes)
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in by_export.graph.nodes)
    data = entry.calibration_data(batches=2)
    for q in (by_fx, by_export):
        mq.calibrate(q, data, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(by_export(x), by_fx(x), rtol=0, atol=1e-6)


class _NotFxTraceable(nn.Module):
    """``range(x.shape[1])`` cannot run on an fx Proxy; torch.export specialises the size and runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x[:, 0]
        for i in range(1, x.shape[1]):
            total = total + x[:, i]
        return self.fc(torch.relu(total))


def test_auto_falls_back_to_export_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(mq.TraceError, match=r"torch\.fx could not trace"):
        mq.prepare(_NotFxTraceable(), "qdq", (x,), capture="fx")
    with caplog.at_level(logging.INFO, logger=PREPARE_LOG):
        q = mq.prepare(_NotFxTraceable(), "qdq", (x,))
    fallback = [r for r in caplog.records if r.name == PREPARE_LOG and "torch.export" in r.getMessage()]
    assert len(fallback) == 1 and "cannot trace _NotFxTraceable" in fallback[0].getMessage()
    assert q.mq_info.capture == "export"
    assert any(n.op == "call_module" and n.target == "fc" for n in q.graph.nodes)
    mq.calibrate(q, [torch.randn(4, 3, 8)], progress=False)  # another batch size: the batch is dynamic


def test_capture_must_be_a_known_front_end() -> None:
    with pytest.raises(mq.ConfigError, match="capture must be one of"):
        mq.prepare(ZOO["mlp_bn"].build(), "qdq", (ZOO["mlp_bn"].inputs(2),), capture="dynamo")


class _Masked(nn.Module):
    """Attention as HuggingFace writes it: an additive mask of finfo.min from a 0/1 attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2) * 0.25
        keep = attention_mask[:, None, :].bool()
        additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(scores + additive, dim=-1) @ self.v(h)


def _token_batch(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2:] = 0
    return {"input_ids": torch.randint(0, 20, (batch, length), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("backend", ["qdq", "tensorrt"])
def test_masked_scores_are_never_quantized(capture: str, backend: str) -> None:
    backend_or_skip(backend)
    q = mq.prepare(_Masked().eval(), backend, _token_batch(2, 6, 0), capture=capture)
    mq.calibrate(q, [_token_batch(3, 6, i) for i in range(3)], progress=False)
    graph = {n.name: n for n in q.graph.nodes}
    quantized = {r["tensor"] for r in q.mq_info.placements[""]}
    masked = [n for n in graph.values() if n.op == "call_function" and any(
        isinstance(a, float) and a < -1e30 for a in n.args)]
    assert masked, "the mask is built in the graph"
    readers = {u for n in masked for u in n.users}  # scores + mask
    assert not quantized & {n.name for n in (*masked, *readers)}
    for r in q.mq_info.placements[""]:
        if r["consumers"] != "all":
            assert not {c for c in r["consumers"]} & {n.name for n in readers}
    scales = [float(m.scale.max()) for m in q.modules() if isinstance(m, FakeQuantizer) and m.role == "activation"]
    assert max(scales) < 1.0  # before the fix: 1.3e36 on the masked sum
    softmax = [n for n in graph.values() if "softmax" in n.name and n.op == "call_function"]
    assert softmax and all(any(u.op == "call_module" and isinstance(q.get_submodule(u.target), FakeQuantizer)
                               for u in n.users) for n in softmax)  # softmax output quantized (the PV matmul input)


@pytest.fixture(scope="module")
def masked_export() -> nn.Module:
    """``_Masked`` captured by torch.export from a tokenizer-style dict (not calibrated)."""
    torch.manual_seed(0)
    return mq.prepare(_Masked().eval(), "qdq", _token_batch(2, 6, 0), capture="export")


def test_export_capture_keeps_batch_and_sequence_dynamic(masked_export: nn.Module) -> None:
    q = copy.deepcopy(masked_export)
    ids, mask = q.mq_info.inputs
    assert ids["name"] == "input_ids" and mask["name"] == "attention_mask"
    assert ids["dynamic"] == {0: "batch", 1: "sequence"} and mask["dynamic"][1] == "sequence"
    mq.calibrate(q, [_token_batch(4, 9, 1), _token_batch(1, 5, 2)], progress=False)  # other lengths and batches
    longer = _token_batch(3, 11, 3)
    out = q(**longer)  # by name, as a tokenizer's dict
    assert out.shape == (3, 11, 16)
    torch.testing.assert_close(q(*as_inputs(longer, q)), out)
    with pytest.raises(mq.CalibrationError, match="only the dynamic dimensions may differ"):
        mq.calibrate(q, [{"input_ids": torch.zeros(2, 6, 3, dtype=torch.long),
                          "attention_mask": torch.ones(2, 6, 3, dtype=torch.long)}], progress=False)


def test_a_dict_of_inputs_needs_the_model_to_be_ordered(masked_export: nn.Module) -> None:
    q = masked_export
    batch = _token_batch(2, 6, 1)
    reordered = {"attention_mask": batch["attention_mask"], "token_type_ids": batch["input_ids"] * 0, **batch}
    assert as_inputs(reordered, q)[0] is batch["input_ids"]
    with pytest.raises(mq.ConfigError, match="need the prepared model"):
        as_inputs(batch)
    with pytest.raises(mq.ConfigError, match="'input_ids' missing"):
        as_inputs({"attention_mask": batch["attention_mask"]}, q)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_checkpoint_of_a_model_prepared_from_a_dict_restores_it(capture: str, tmp_path: Path) -> None:
    batch = _token_batch(2, 6, 0)
    example = {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"]}  # not forward's order
    q = mq.prepare(_Masked().eval(), "qdq", example, capture=capture)
    mq.calibrate(q, [_token_batch(3, 6, i) for i in range(2)], progress=False)
    record = mq.load_checkpoint(mq.save_checkpoint(q, tmp_path / "q.pt", example))
    assert [(s["key"], s["dtype"]) for s in record["inputs"]] == [("attention_mask", "int64"), ("input_ids", "int64")]
    rebuilt = inputs_from_specs(record["inputs"])
    assert isinstance(rebuilt, dict) and list(rebuilt) == ["attention_mask", "input_ids"]
    restored = mq.restore(_Masked().eval(), record)  # other random weights: the checkpoint's are loaded
    assert restored.mq_info.input_names() == q.mq_info.input_names()
    assert restored.mq_info.placements == q.mq_info.placements
    test = _token_batch(3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(restored(*as_inputs(test, restored)), q(*as_inputs(test, q)), rtol=0, atol=0)


class _WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.attn(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_multihead_attention_stays_float_with_a_warning(capture: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=PREPARE_LOG):
        q = mq.prepare(_WithMHA().eval(), "qdq", (torch.randn(2, 5, 16),), capture=capture)
    assert any("nn.MultiheadAttention attn stays in float" in r.getMessage() for r in caplog.records)
    assert _weights(q) == {"proj"}
    scopes = {n.name: n.meta.get("mq_scope", ()) for n in q.graph.nodes}
    inside = {name for name, scope in scopes.items() if "attn" in scope} | {"attn"}
    assert not {r["tensor"] for r in q.mq_info.placements[""]} & inside

