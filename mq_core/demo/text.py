"""The built-in text demo: sentiment of short review sentences, and a small transformer encoder that learns it.

``mq quantize --demo text`` quantizes this model end to end, as the digits demo does for CNNs. Everything is
embedded: no download, no tokenizer package, no ``transformers``.

The task is generated deterministically from a small grammar, and it is one a bag of words cannot solve: a clause
is "<subject> <verb> [not|never] [intensifier] <adjective>", and a sentence is one clause, two clauses joined by
"and" (same sentiment), or two joined by "but" (opposite sentiments; the second one decides). The label needs word
order and context: negation flips the adjective, "but" hands the decision to the clause after it. Sentences are
padded to a fixed length with ``PAD``, so the model sees an attention mask like a HuggingFace encoder's.

The model is written in plain torch (``nn.Linear``/``nn.LayerNorm``/GELU, attention as matmuls and softmax, an
additive mask of ``finfo.min`` on padded keys as HuggingFace adds), so it exercises every op kind mq places for
transformers while fx can still trace it. Trained weights are cached beside the digits demo's
(``mq_core.demo.digits.cache_dir``) and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mq_core.demo.digits import cache_dir
from mq_core.demo.split import SplitData
from mq_core.errors import ConfigError
from mq_core.io import atomic_torch_save

log = logging.getLogger(__name__)

SUBJECTS = ("the movie", "the film", "the food", "the service", "the hotel", "the book", "this phone", "the music",
            "the staff", "the room", "the game", "the show")
VERBS = ("was", "is", "seemed", "felt", "looked")
NEGATIONS = ("not", "never")
INTENSIFIERS = ("very", "really", "quite", "so", "truly")
POSITIVE = ("good", "great", "excellent", "wonderful", "delightful", "fantastic", "pleasant", "superb", "lovely",
            "brilliant")
NEGATIVE = ("bad", "awful", "terrible", "boring", "dreadful", "poor", "horrible", "disappointing", "dull",
            "mediocre")
CLASSES = ("negative", "positive")

PAD, CLS, UNK = 0, 1, 2
#: Token ids: the three special tokens, then every word of the grammar.
VOCAB: tuple[str, ...] = ("[PAD]", "[CLS]", "[UNK]", *dict.fromkeys(
    w for phrase in (*SUBJECTS, *VERBS, *NEGATIONS, *INTENSIFIERS, *POSITIVE, *NEGATIVE, "and", "but")
    for w in phrase.split()))
_IDS = {w: i for i, w in enumerate(VOCAB)}
#: Tokens per sentence, [CLS] included: the longest sentence ("[CLS]" + two clauses of 6 words + "but") is 14.
MAX_LENGTH = 16


def tokenize(sentences: Sequence[str], length: int = MAX_LENGTH) -> torch.Tensor:
    """Token ids [N, length] (int64): ``[CLS]``, the words (unknown ones as ``[UNK]``), then ``[PAD]``. A sentence
    longer than ``length`` is cut."""
    ids = torch.full((len(sentences), length), PAD, dtype=torch.long)
    for row, sentence in enumerate(sentences):
        tokens = [CLS, *(_IDS.get(w, UNK) for w in sentence.lower().replace(",", " ").split())][:length]
        ids[row, :len(tokens)] = torch.tensor(tokens)
    return ids


def _pick(options: Sequence[str], gen: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _clause(positive: bool, gen: torch.Generator) -> str:
    """A clause whose meaning is ``positive``: a negated clause says the opposite of its adjective."""
    negated = bool(torch.rand(1, generator=gen) < 0.4)
    words = [_pick(SUBJECTS, gen), _pick(VERBS, gen)]
    if negated:
        words.append(_pick(NEGATIONS, gen))
    if bool(torch.rand(1, generator=gen) < 0.5):
        words.append(_pick(INTENSIFIERS, gen))
    words.append(_pick(POSITIVE if positive != negated else NEGATIVE, gen))
    return " ".join(words)


def sentences(count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``count`` sentences of the grammar (module docstring) and their labels (1 positive, 0 negative)."""
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(count):
        positive = bool(torch.rand(1, generator=gen) < 0.5)
        shape = float(torch.rand(1, generator=gen))
        if shape < 0.5:
            text = _clause(positive, gen)
        elif shape < 0.7:
            text = f"{_clause(positive, gen)} and {_clause(positive, gen)}"
        else:
            text = f"{_clause(not positive, gen)} but {_clause(positive, gen)}"
        texts.append(text)
        labels.append(int(positive))
    return texts, torch.tensor(labels, dtype=torch.long)


@dataclass(frozen=True)
class TextData(SplitData):
    """Train/test split of the sentiment task, as token ids [N, MAX_LENGTH] and labels [N], and the test sentences."""

    test_sentences: list[str]


def load_text(seed: int = 0, train: int = 4000, test: int = 1000) -> TextData:
    """The task's sentences: a training set and a test set whose sentences never occur in the training set."""
    train_texts, y_train = sentences(train, seed)
    seen = set(train_texts)
    candidates, labels = sentences(2 * test, seed + 1)
    keep = [i for i, text in enumerate(candidates) if text not in seen][:test]
    test_texts = [candidates[i] for i in keep]
    return TextData(tokenize(train_texts), y_train, tokenize(test_texts), labels[keep], test_texts)


class SelfAttention(nn.Module):
    """Multi-head self-attention as HuggingFace encoders write it: Linear projections, ``q @ kᵀ`` scaled, an
    additive mask, softmax, ``@ v``, output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2)
        return self.out(context.reshape(x.shape[0], -1, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (as BERT): attention and a GELU feed-forward, each with a residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, mask_bias))
        return self.norm2(x + self.fc2(self.act(self.fc1(x))))


class TextClassifier(nn.Module):
    """Token and position embeddings, two encoder layers, the ``[CLS]`` token's state -> Linear: ~20k parameters.

    Takes token ids [batch, length] (int64, ``PAD`` = 0 for padding); padded keys get ``finfo.min`` added to their
    attention scores, so they get no attention.
    """

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 32, heads: int = 2, hidden: int = 64,
                 layers: int = 2, max_length: int = MAX_LENGTH, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_length, dim)
        self.register_buffer("position_ids", torch.arange(max_length).unsqueeze(0), persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = (input_ids != PAD).to(torch.float32)
        mask_bias = (1.0 - keep[:, None, None, :]) * torch.finfo(torch.float32).min
        x = self.tokens(input_ids) + self.positions(self.position_ids[:, :input_ids.shape[1]])
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x, mask_bias)
        return self.head(x[:, 0])


def train(model: nn.Module, data: TextData, epochs: int = 4, lr: float = 3e-3, seed: int = 0,
          progress: bool = False) -> nn.Module:
    """AdamW with a one-cycle schedule over ``epochs`` passes of the training set (four reach 100% on the held-out
    sentences in a few seconds on one core); deterministic for a given seed."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * math.ceil(len(data.x_train) / 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in tqdm(range(epochs), desc="train text", disable=not progress, leave=False):
        for xb, yb in data.train_batches(seed=seed + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def pretrained(seed: int = 0, epochs: int = 4, progress: bool = False) -> nn.Module:
    """The text classifier trained once (seconds) and cached; later calls load it (``weights_only=True``)."""
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}.")
    key = hashlib.sha256(f"text-{seed}-{epochs}-{torch.__version__}-v1".encode()).hexdigest()[:16]
    path = cache_dir() / f"text-classifier-{key}.pt"
    torch.manual_seed(seed)
    model = TextClassifier()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt or foreign cache file is retrained, never trusted
            log.warning("ignoring unreadable cached text model %s (%s); retraining", path, exc)
    log.info("training the text demo model (cached at %s)", path)
    train(model, load_text(seed), epochs=epochs, seed=seed, progress=progress)
    atomic_torch_save(model.state_dict(), path)
    return model
