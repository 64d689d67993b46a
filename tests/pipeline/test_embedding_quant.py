"""Embedding tables are quantized per backend: per row (int8, axis 0) on ``qdq``, whose runtime dequantizes the table
and gathers from it; float on the others. Both capture front-ends; the QDQ export holds an int8 table feeding
DequantizeLinear(axis=0) -> Gather and verifies in the real runtimes, layer by layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import mq_core as mq
from mq_core.nn.embedding import QEmbedding

VOCAB, DIM, LENGTH = 30, 8, 5


class _Tagger(nn.Module):
    """Token embedding (row 0 is padding) -> Linear: the smallest model that reads a table."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0, max_norm=max_norm)
        self.fc = nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def _ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def _prepared(backend: str, capture: str, model: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    qmodel = mq.prepare((model or _Tagger()).eval(), backend, (_ids(2, 0),), capture=capture)
    mq.calibrate(qmodel, [(_ids(4, s),) for s in range(1, 3)], progress=False)
    return qmodel


@pytest.fixture(scope="module", params=["fx", "export"])
def qdq_model(request: pytest.FixtureRequest) -> nn.Module:
    qmodel = _prepared("qdq", request.param)
    assert qmodel.mq_info.capture == request.param
    return qmodel


def test_qdq_quantizes_the_table_per_row_and_simulates_the_lookup_of_it(qdq_model: nn.Module) -> None:
    emb = qdq_model.get_submodule("emb")
    assert isinstance(emb, QEmbedding) and emb.weight_fake_quant.ch_axis == 0
    assert emb.weight_fake_quant.scale.shape == (VOCAB,)
    table = emb.weight.detach()
    scale = table.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # int8 symmetric, one grid per row
    expected = torch.clamp(torch.round(table / scale), -127, 127) * scale
    ids = _ids(3, 5)
    with torch.no_grad():
        got = emb(ids)
    torch.testing.assert_close(got, F.embedding(ids, expected), rtol=0, atol=1e-7)
    assert not torch.equal(got, F.embedding(ids, table))  # the float table would not do
    with torch.no_grad(), mq.integer_simulation(qdq_model.eval()) as sim:
        assert "emb" not in sim.ops  # the lookup of the dequantized table is exact in the default simulation
        torch.testing.assert_close(qdq_model.emb(ids), got, rtol=0, atol=0)


def test_qdq_export_gathers_from_a_dequantized_int8_table_and_verifies(qdq_model: nn.Module, tmp_path: Path) -> None:
    result = mq.export(qdq_model, (_ids(2, 0),), tmp_path / "out")
    graph = result.qdq_model.graph
    initializers = {i.name: i for i in graph.initializer}
    dequantize = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "emb.weight")
    codes = numpy_helper.to_array(initializers["emb.weight"])
    assert codes.dtype == np.int8 and codes.shape == (VOCAB, DIM)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dequantize.attribute}.get("axis", 1) == 0
    gather = next(n for n in graph.node if n.op_type == "Gather")
    assert gather.input[0] == dequantize.output[0]
    report = mq.verify(result, (_ids(3, 9),), runtimes=["onnxruntime", "onnxruntime-opt"], layers=True)
    assert report.passed, report
    assert any(c.tensor == "emb" and c.exact == 1.0 for c in report.layers.checks)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("backend", ["tensorrt", "snpe"])
def test_other_backends_keep_the_table_float(backend: str, capture: str) -> None:
    torch.manual_seed(0)
    qmodel = mq.prepare(_Tagger().eval(), backend, (_ids(2, 0),), capture=capture)
    emb = qmodel.get_submodule("emb")
    assert type(emb) is nn.Embedding and not hasattr(emb, "weight_fake_quant")
    assert hasattr(qmodel.get_submodule("fc"), "weight_fake_quant")  # the Linear's weight still is quantized


def test_a_max_norm_table_stays_float_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mq_core.graph.qat_swap"):
        qmodel = mq.prepare(_Tagger(max_norm=1.0).eval(), "qdq", (_ids(2, 0),), capture="fx")
    assert type(qmodel.get_submodule("emb")) is nn.Embedding
    assert any("emb (Embedding) keeps a float weight" in r.getMessage() and "max_norm" in r.getMessage()
               for r in caplog.records)


def test_qat_trains_the_table_through_its_quantizer_and_a_checkpoint_restores_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    float_model = _Tagger().train()
    qmodel = mq.prepare(float_model, "qdq", (_ids(2, 0),), mode="qat", capture="fx")
    loss = qmodel(_ids(4, 1)).square().mean()
    loss.backward()
    grad = qmodel.get_submodule("emb").weight.grad
    assert grad is not None and grad.layout == torch.strided and grad.abs().sum() > 0
    qmodel.eval()
    mq.calibrate(qmodel, [(_ids(4, 2),)], progress=False)
    path = mq.save_checkpoint(qmodel, tmp_path / "ckpt.pt", (_ids(2, 0),))
    restored = mq.restore(float_model, mq.load_checkpoint(path))
    assert isinstance(restored.get_submodule("emb"), QEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(_ids(3, 4)), qmodel(_ids(3, 4)), rtol=0, atol=0)
