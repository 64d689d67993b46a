"""Min/max observers: the running extremes, or their exponential moving average."""

from __future__ import annotations

import torch

from mq_core.quant.observers.base import Observer, channels_first
from mq_core.quant.scheme import QuantScheme


class MinMaxObserver(Observer):
    """Running minimum and maximum over every batch seen (per channel along ``scheme.ch_axis`` if per-channel)."""

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
    """Exponential moving average of per-batch min/max: ``m <- (1 - c) m + c * current`` (first batch sets m)."""

    def __init__(self, scheme: QuantScheme, averaging_constant: float = 0.1) -> None:
        super().__init__(scheme)
        self.averaging_constant = averaging_constant

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        c = self.averaging_constant
        self.min_val = self.min_val * (1 - c) + lo * c
        self.max_val = self.max_val * (1 - c) + hi * c
