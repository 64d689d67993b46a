"""Min/max observers: the running extremes, or their exponential moving average."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist

from mq_core.quant.observers.base import Observer, channels_first, gather_ranks
from mq_core.quant.scheme import QuantScheme


class MinMaxObserver(Observer):
    """Running minimum and maximum over every batch seen (per channel along ``scheme.ch_axis`` if per-channel).

    Across ranks (``sync``): all-reduce MIN of ``min_val`` and MAX of ``max_val``, exactly the single-process result.
    """

    merge_rules: ClassVar[dict[str, str]] = {"min_val": "min", "max_val": "max"}

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ch_axis is None:
            return torch.aminmax(x)
        return torch.aminmax(channels_first(x, self.ch_axis), dim=1)

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_range(x)
        if not self.observed:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.merge(lo, hi)

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class EMAMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max: ``m <- (1 - c) m + c * current`` (first batch sets m).

    Across ranks (``sync``) the result is the EMA over the ranks' batches taken one rank after the other (rank 0's
    batches, then rank 1's, ...): an EMA depends on the order of the batches, and that order is the one a single
    process gets from the ranks' shards concatenated. Rank ``r``'s EMA ``m_r`` over ``n_r`` batches whose first
    batch gave ``f_r`` continues an EMA ``m`` as ``(1 - c)**n_r * (m - f_r) + m_r``, so each rank only needs its
    first batch's values (``first_min``/``first_max``, not saved in the state dict: a rank whose statistics were
    loaded from a checkpoint uses its EMA in their place).
    """

    def __init__(self, scheme: QuantScheme, averaging_constant: float = 0.1) -> None:
        super().__init__(scheme)
        self.averaging_constant = averaging_constant
        self.register_buffer("first_min", torch.empty(0), persistent=False)
        self.register_buffer("first_max", torch.empty(0), persistent=False)

    def observe(self, x: torch.Tensor) -> None:
        first = not self.observed
        super().observe(x)
        if first:
            self.first_min, self.first_max = self.min_val.clone(), self.max_val.clone()

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        c = self.averaging_constant
        self.min_val = self.min_val * (1 - c) + lo * c
        self.max_val = self.max_val * (1 - c) + hi * c

    def merge_ranks(self, counts: list[int], source: int, group: dist.ProcessGroup | None) -> None:
        keep = (1 - self.averaging_constant) ** torch.tensor(counts, dtype=torch.float64)
        merged = []
        for ema, first in ((self.min_val, self.first_min), (self.max_val, self.first_max)):
            if first.shape != ema.shape:  # loaded from a checkpoint (or no data): the EMA stands in for it
                first = ema
            emas, firsts = gather_ranks(ema, group), gather_ranks(first, group)
            total = emas[source]
            for rank in range(source + 1, len(counts)):
                if counts[rank]:
                    total = (keep[rank] * (total.double() - firsts[rank]) + emas[rank]).to(ema.dtype)
            merged.append((total, firsts[source]))
        (self.min_val, self.first_min), (self.max_val, self.first_max) = merged
