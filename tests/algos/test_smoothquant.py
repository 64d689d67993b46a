"""SmoothQuant (mq-algos ``smoothquant``): the smoothing keeps the float function, moves planted activation outliers
into the weights so that W8A8 gets closer to float, reads its ``alpha`` option, and composes with the other methods.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from mq_algos.ptq.smoothquant import SmoothQuantConfig, find_groups, smooth
from torch import nn

import mq_core as mq
from mq_core.errors import ConfigError
from mq_core.plugin_api import CalibrationData
from mq_core.quant.switches import disable_all

WIDTH = 32
OUTLIERS = (3, 17, 28)


class Block(nn.Module):
    """A pre-LN transformer block of Linears: LayerNorm -> Q/K/V -> attention -> output projection (+ residual),
    LayerNorm -> fc1 -> ReLU -> fc2 (+ residual). Producers: ln1 (Q/K/V), v (o, through the attention matmul),
    ln2 (fc1), fc1 (fc2, through ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / WIDTH**0.5
        x = x + self.o(torch.softmax(scores, -1) @ self.v(h))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


def outlier_block(seed: int = 0) -> Block:
    """A Block whose LayerNorm outputs carry a few channels 40x larger than the rest (the same channels for every
    token), as trained transformers do; the next Linears' columns are scaled down by as much, so the float function
    is an ordinary one."""
    torch.manual_seed(seed)
    block = Block()
    with torch.no_grad():
        for ln, readers in ((block.ln1, (block.q, block.k, block.v)), (block.ln2, (block.fc1,))):
            ln.bias.uniform_(-0.1, 0.1)
            for channel in OUTLIERS:
                ln.weight[channel] *= 40
                ln.bias[channel] *= 40
                for linear in readers:
                    linear.weight[:, channel] /= 40
    return block.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randn(16, 12, WIDTH, generator=torch.Generator().manual_seed(1))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _sqnr(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()))


def _float_output(qmodel: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(qmodel)
    disable_all(model)
    with torch.no_grad():
        return model(*args, **kwargs)


def test_groups_follow_the_producers_of_a_transformer_block(tokens: torch.Tensor) -> None:
    qmodel = mq.prepare(outlier_block(), "qdq", example_inputs=(tokens[:1],))
    groups = {g.producer: g.linears for g in find_groups(qmodel)}
    assert groups == {"ln1": ["q", "k", "v"], "v": ["o"], "ln2": ["fc1"], "fc1": ["fc2"]}


def test_smoothing_keeps_the_float_function_and_smooths_every_group(tokens: torch.Tensor) -> None:
    model = outlier_block()
    qmodel = mq.prepare(model, "qdq", example_inputs=(tokens[:1],))
    applied = smooth(qmodel, SmoothQuantConfig(), CalibrationData(list(tokens.split(4))))
    assert sorted(applied) == ["fc1", "ln1", "ln2", "v"]
    with torch.no_grad():
        want = model(tokens)
    assert _relative(_float_output(qmodel, tokens), want) < 1e-5
    # the planted channels are the ones scaled down most
    assert set(applied["ln1"].topk(len(OUTLIERS)).indices.tolist()) == set(OUTLIERS)


def test_smoothing_improves_w8a8_on_planted_outliers(tokens: torch.Tensor) -> None:
    model = outlier_block()
    with torch.no_grad():
        want = model(tokens)
    plain = mq.prepare(model, "qdq", example_inputs=(tokens[:1],))
    mq.calibrate(plain, tokens, progress=False)
    smoothed = mq.prepare(model, "qdq", example_inputs=(tokens[:1],))
    mq.ptq(smoothed, "smoothquant", tokens, progress=False)
    with torch.no_grad():
        before, after = _sqnr(plain(tokens), want), _sqnr(smoothed(tokens), want)
    assert after > before + 6, (before, after)


def test_alpha_option_sets_the_migration_strength(tokens: torch.Tensor) -> None:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) for ln1's readers, from the option as the CLI passes it."""
    model = outlier_block()
    with torch.no_grad():
        h = model.ln1(tokens)
    absmax = h.abs().reshape(-1, WIDTH).amax(0)
    weight = torch.stack([m.weight.abs().amax(0) for m in (model.q, model.k, model.v)]).amax(0)
    for alpha in (0.5, 0.8):
        qmodel = mq.prepare(model, "qdq", example_inputs=(tokens[:1],))
        mq.ptq(qmodel, "smoothquant", tokens, progress=False, **({"alpha": alpha} if alpha != 0.5 else {}))
        got = model.ln1.weight / qmodel.get_submodule("ln1").weight
        want = absmax.pow(alpha) / weight.pow(1 - alpha)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_composes_before_calibrated_methods_only(tokens: torch.Tensor) -> None:
    qmodel = mq.prepare(outlier_block(), "qdq", example_inputs=(tokens[:1],))
    mq.ptq(qmodel, "smoothquant,bias_correction", tokens, progress=False, alpha=0.7)
    assert all(fq.is_calibrated for fq in mq.quantizers(qmodel).values())
    with pytest.raises(ConfigError, match="before"):
        mq.ptq(qmodel, "bias_correction,smoothquant", tokens, progress=False)
    with pytest.raises(ConfigError, match="alpha"):
        mq.ptq(qmodel, "smoothquant", tokens, progress=False, alpha=1.5)


def test_tiny_bert_keeps_its_float_function_and_skips_inexact_producers(caplog: pytest.LogCaptureFixture) -> None:
    """Post-LN BERT (torch.export capture): each LayerNorm's output also feeds a residual add, so it cannot absorb
    the factors and is skipped; the value projection absorbs them for the attention output projection."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, max_position_embeddings=16, attn_implementation="eager",
                                     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 50, (4, 10), generator=g),
                "attention_mask": torch.ones(4, 10, dtype=torch.long)} for _ in range(2)]
    qmodel = mq.prepare(model, "qdq", example_inputs=batches[0])
    with caplog.at_level(logging.DEBUG, logger="mq_algos.ptq.smoothquant"):
        applied = smooth(qmodel, SmoothQuantConfig(alpha=0.8), CalibrationData(batches))
    assert list(applied) == ["encoder.layer.0.attention.self.value"]
    assert "embeddings.LayerNorm -> encoder.layer.0.attention.self.query" in caplog.text
    with torch.no_grad():
        want = model(**batches[1]).last_hidden_state
    assert _relative(_float_output(qmodel, **batches[1])[0], want) < 1e-5
