"""ClipStd observer: a range of ``k`` standard deviations around the mean, never narrower than min/max.

As the reference states it, the rule widens and does not clip: ``lo = min(mu - k sigma, min)`` and
``hi = max(mu + k sigma, max)``. It matters for tensors whose observed extremes understate the spread of later
data (few calibration samples of a wide distribution).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mq_core.quant.observers.base import channels_first
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.scheme import QuantScheme


class ClipStdObserver(MinMaxObserver):
    """Mean and (population) standard deviation of every element seen, per channel when per-channel.

    Count, sum and sum of squares are kept in float64 buffers, so any split of the data into batches gives the
    statistics of the concatenated data (up to float64 rounding). Across ranks (``sync``) the three are summed and
    min/max all-reduced, which gives the single-process statistics of every rank's data in the same way.

    Args:
        k: number of standard deviations on each side of the mean.
    """

    merge_rules: ClassVar[dict[str, str]] = {
        **MinMaxObserver.merge_rules, "count": "sum", "sum": "sum", "sum_sq": "sum",
    }

    def __init__(self, scheme: QuantScheme, k: float = 2.6) -> None:
        super().__init__(scheme)
        self.k = float(k)
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("sum", torch.empty(0, dtype=torch.float64))
        self.register_buffer("sum_sq", torch.empty(0, dtype=torch.float64))

    def observe(self, x: torch.Tensor) -> None:
        first = not self.observed
        super().observe(x)
        rows = x.reshape(1, -1) if self.ch_axis is None else channels_first(x, self.ch_axis)
        rows = rows.to(torch.float64)
        shape = self.min_val.shape
        batch_sum = rows.sum(dim=1).reshape(shape)
        batch_sum_sq = rows.square().sum(dim=1).reshape(shape)
        if first:
            self.sum, self.sum_sq = batch_sum, batch_sum_sq
        else:
            self.sum, self.sum_sq = self.sum + batch_sum, self.sum_sq + batch_sum_sq
        self.count += rows.shape[1]

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count.to(torch.float64)
        mean = self.sum / n
        std = (self.sum_sq / n - mean.square()).clamp(min=0).sqrt()
        lo = torch.minimum((mean - self.k * std).to(torch.float32), self.min_val)
        hi = torch.maximum((mean + self.k * std).to(torch.float32), self.max_val)
        return lo, hi
