"""QAT on the torch.export front-end: conv models get the same QAT modules (BN folding simulated in training) as on
the fx front-end and train to the same weights and BatchNorm statistics; learnable (LSQ) quantizers on a
HuggingFace BERT's Linear layers receive gradients and reduce the loss, and the trained model exports and verifies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mq_core as mq
from mq_core.nn import QATBnModule
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.testing.zoo import ZOO, randomize_bn

pytestmark = pytest.mark.usefixtures("deterministic")

STEPS = 4


class _Spellings(nn.Module):
    """Conv-BN-ReLU blocks in the spellings models use, which torch.export records as different ATen ops: a ReLU
    module, ``F.relu(inplace=True)`` and ``x.relu_()`` (``aten.relu_``), ``F.relu6`` (``aten.relu6``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu6(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y)).relu_()
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x + y, 1), 1))


def _spellings() -> nn.Module:
    torch.manual_seed(0)
    model = _Spellings()
    randomize_bn(model)
    return model


CONV_MODELS: dict[str, Callable[[], nn.Module]] = {"resnet": ZOO["resnet"].build, "spellings": _spellings}


def _layers(qmodel: nn.Module) -> dict[str, type]:
    """Every module but the activation quantizers (named after graph nodes, which the front-ends name differently)
    and what they hold: the QAT layers, their fused BN and activation, their weight quantizers."""
    activation = [name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantizer) and m.role == "activation"]
    return {name: type(m) for name, m in qmodel.named_modules()
            if name and not any(name == a or name.startswith(a + ".") for a in activation)}


def _loose_activations(qmodel: nn.Module) -> int:
    return sum(n.op in ("call_function", "call_method") and any(a in str(n.target) for a in ("relu", "hardtanh"))
               for n in qmodel.graph.nodes)


def _placement(qmodel: nn.Module) -> list[tuple[str, int, bool]]:
    return sorted((r["reason"], 0 if r["consumers"] == "all" else len(r["consumers"]), r["unsigned"])
                  for r in qmodel.mq_info.placements[""])


@pytest.mark.parametrize("name", sorted(CONV_MODELS))
def test_conv_bn_qat_on_export_matches_fx_and_trains_alike(name: str) -> None:
    model = CONV_MODELS[name]().train()
    x = torch.randn(8, 3, 16, 16)
    qmodels = {capture: mq.prepare(model, "qdq", x, mode="qat", capture=capture) for capture in ("fx", "export")}
    by_fx, by_export = qmodels["fx"], qmodels["export"]
    assert by_export.mq_info.capture == "export"
    layers = _layers(by_export)
    assert layers == _layers(by_fx)
    bn_layers = [n for n, m in by_export.named_modules() if isinstance(m, QATBnModule)]
    assert len(bn_layers) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # every BN: simulated fold
    assert not [n for n in by_export.graph.nodes if "batch_norm" in str(n.target)]
    assert _loose_activations(by_export) == _loose_activations(by_fx)  # those after adds; the rest are fused
    assert _placement(by_export) == _placement(by_fx)
    before = {layer: by_export.get_submodule(layer).bn.running_mean.clone() for layer in bn_layers}

    for qmodel in qmodels.values():
        mq.calibrate(qmodel, [x[:4], x[4:]], progress=False)
        qmodel.train()
    optimizers = {c: torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9) for c, q in qmodels.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        xb, yb = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        outputs = {}
        for capture, qmodel in qmodels.items():
            outputs[capture] = qmodel(xb)
            optimizers[capture].zero_grad()
            F.cross_entropy(outputs[capture], yb).backward()
            optimizers[capture].step()
        torch.testing.assert_close(outputs["export"], outputs["fx"], rtol=0, atol=1e-5)

    for layer in bn_layers:  # training used batch statistics and updated the running ones, the same on both
        bn_fx, bn_export = by_fx.get_submodule(layer).bn, by_export.get_submodule(layer).bn
        assert int(bn_export.num_batches_tracked) == int(bn_fx.num_batches_tracked) == STEPS
        torch.testing.assert_close(bn_export.running_mean, bn_fx.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(bn_export.running_var, bn_fx.running_var, rtol=0, atol=1e-6)
        assert not torch.allclose(bn_export.running_mean, before[layer])
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        torch.testing.assert_close(by_export.eval()(x), by_fx.eval()(x), rtol=0, atol=1e-5)


class _FunctionalDropout(nn.Module):
    """Dropout as HuggingFace attention writes it: a function whose ``training`` flag is read when it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), p=0.5, training=self.training))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_functional_dropout_follows_train_and_eval(capture: str) -> None:
    """Captured in train mode for QAT, a functional dropout used to stay on after ``eval()`` (capture records the
    flag as a constant): evaluation, export and verification then saw random outputs."""
    x = torch.randn(8, 16)
    qmodel = mq.prepare(_FunctionalDropout().train(), "qdq", x, mode="qat", capture=capture)
    mq.calibrate(qmodel, [x], progress=False)
    dropouts = [m for m in qmodel.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    with torch.no_grad():
        qmodel.eval()
        assert torch.equal(qmodel(x), qmodel(x))
        qmodel.train()
        assert not torch.equal(qmodel(x), qmodel(x))


def test_lsq_on_bert_linears_learns_and_exports(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("mq_algos")
    vocab = 50
    config = transformers.BertConfig(vocab_size=vocab, max_position_embeddings=16, hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    float_model = transformers.BertModel(config).eval()

    def tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length - 2:] = 0
        return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g), "attention_mask": mask}

    # W2A4: with LayerNorm/GELU and the residual stream in float (the qdq placement), W4A4 starts within noise of the
    # float model (MSE 3e-4) and 20 steps have nothing to learn; W2 weights leave a loss that QAT visibly reduces
    qmodel = mq.prepare(float_model, "qdq", tokens(2, 6, 0), qconfig="w2a4-lsq", mode="qat", capture="export")
    assert qmodel.mq_info.capture == "export"
    mq.calibrate(qmodel, [tokens(4, 6 + i, i) for i in range(2)], progress=False)  # sizes the LSQ step sizes
    linears = {name: m for name, m in qmodel.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 7  # q, k, v, attention output, intermediate, output, pooler
    quantizers = [m for m in qmodel.modules() if isinstance(m, FakeQuantizer)]
    assert {type(q).__name__ for q in quantizers} == {"LSQFakeQuantizer"}
    for q in quantizers:
        assert isinstance(q.scale, nn.Parameter), q.qname

    batch = tokens(8, 7, 10)
    with torch.no_grad():
        reference = float_model(**batch)

    def loss_fn() -> torch.Tensor:
        out = qmodel(**batch)
        return F.mse_loss(out[0], reference.last_hidden_state) + F.mse_loss(out[1], reference.pooler_output)

    with torch.no_grad():
        initial = loss_fn().item()
    qmodel.train()
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-4)  # low-bit weight step sizes are ~1e-2: small steps
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        if not losses:
            for name, layer in linears.items():
                grad = layer.weight_fake_quant.scale.grad
                assert grad is not None and bool(grad.abs().sum() > 0), f"{name}: its step size gets no gradient"
            moving = [q.qname for q in quantizers if q.role == "activation" and q.scale.grad is not None
                      and bool(q.scale.grad.abs().sum() > 0)]
            assert len(moving) >= len(linears), moving
        optimizer.step()
        losses.append(loss.item())
    qmodel.eval()
    with torch.no_grad():
        final = loss_fn().item()
    assert final < 0.9 * initial, (initial, losses, final)

    result = mq.export(qmodel, tokens(2, 6, 0), tmp_path / "bert-lsq")
    report = mq.verify(result, tokens(3, 9, 7), runtimes="onnxruntime")
    assert report.passed, report.table()
