"""The built-in demo task: scikit-learn's bundled 8x8 digits (ships offline), a small CNN and a residual variant.

Used by ``mq quantize`` with no arguments, by the examples, by the accuracy tests and by the benchmarks. Trained
weights are cached in the user's cache directory (``$MQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/mq``, else
``~/.cache/mq``), keyed by architecture, seed, epochs and torch version, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mq_core.demo.split import SplitData
from mq_core.errors import ConfigError
from mq_core.io import atomic_torch_save

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsData(SplitData):
    """Train/test split of the digits, images as [N, 1, 8, 8] floats in [0, 1]."""


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """The digits split deterministically (stratified by class) into train and test."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ConfigError(
            "the built-in digits demo needs scikit-learn: pip install 'mq-core[demo]'"
        ) from exc
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = round(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    tr, te = torch.cat(train).sort().values, torch.cat(test).sort().values
    return DigitsData(x[tr], y[tr], x[te], y[te])


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers, max-pool, global average pool, Linear: ~15k parameters."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width), *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsResNet(nn.Module):
    """Stem, two residual blocks around a max-pool, global average pool, Linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(1, width))
        self.block1 = _Residual(width)
        self.pool = nn.MaxPool2d(2)
        self.block2 = _Residual(width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.pool(self.block1(self.stem(x)))))


ARCHITECTURES: dict[str, type[nn.Module]] = {"cnn": DigitsCNN, "resnet": DigitsResNet}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(x)


def train(model: nn.Module, data: DigitsData, epochs: int = 12, lr: float = 0.05, seed: int = 0,
          progress: bool = False) -> nn.Module:
    """Plain SGD-momentum training with cosine decay; deterministic for a given seed."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    model.train()
    for epoch in tqdm(range(epochs), desc="train digits", disable=not progress, leave=False):
        for xb, yb in data.train_batches(seed=seed + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def cache_dir() -> Path:
    if os.environ.get("MQ_CACHE_DIR"):
        return Path(os.environ["MQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mq"


def pretrained(arch: str = "cnn", seed: int = 0, epochs: int = 12, progress: bool = False) -> nn.Module:
    """A digits model trained once and cached; later calls load it (``torch.load(weights_only=True)``)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown digits architecture {arch!r}; choose from {sorted(ARCHITECTURES)}.")
    key = hashlib.sha256(f"{arch}-{seed}-{epochs}-{torch.__version__}-v1".encode()).hexdigest()[:16]
    path = cache_dir() / f"digits-{arch}-{key}.pt"
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt or foreign cache file is retrained, never trusted
            log.warning("ignoring unreadable cached digits model %s (%s); retraining", path, exc)
    log.info("training the digits %s model (cached at %s)", arch, path)
    train(model, load_digits(seed), epochs=epochs, seed=seed, progress=progress)
    atomic_torch_save(model.state_dict(), path)
    return model
