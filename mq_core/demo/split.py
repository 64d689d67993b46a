"""A demo task's train/test split and the batches the demos train and calibrate with (digits and text alike)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitData:
    """Inputs and labels of a training set and a disjoint test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_batches(self, batch_size: int = 64, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.x_train[idx], self.y_train[idx]

    def calibration_batches(self, num_batches: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
        """The first training samples (never test samples), as calibration data."""
        return [self.x_train[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
