"""MSE observer: the clipping range that minimises the Lp quantization error of each batch.

Low bit widths (4 bits and below) cannot afford to spend levels on outliers; searching the shrink factor of the
min/max range trades clipping error against rounding error directly on the quantity that matters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mq_core.errors import ConfigError
from mq_core.quant.functional import fake_quantize
from mq_core.quant.observers.base import channels_first
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.scheme import QuantScheme

#: Shrink step of the search grid: candidate i clips to ``[lo, hi] * (1 - STEP * i)``.
STEP = 0.01


class MSEObserver(MinMaxObserver):
    """Grid search of ``[lo, hi] * (1 - 0.01 i)``, i < ``num_candidates``, minimising ``mean |x' - x|^p``.

    ``x'`` is the exact fake quantization of the batch with ``scheme.qparams`` of the candidate range, so the
    search sees the same grid (symmetry, narrow range, power-of-two scales) the model will use. Per-channel
    searches every channel independently (all channels at once per candidate). Candidate 0 is the batch's
    min/max and ties keep the wider range, so a batch's result is never worse than min/max on that batch.

    Across batches the chosen ``lo``/``hi`` are averaged with equal weight (running mean), so the result does
    not depend on which batch came first. Across ranks (``sync``) the ranks' means are averaged weighted by their
    batch counts: the mean over every rank's batches, as one process computes it (up to float rounding).

    Args:
        p: exponent of the error norm (2.0 = MSE; 2.4 is common for weights).
        num_candidates: grid size, 1 to 100 (the last candidate keeps 1% of the range).
    """

    def __init__(self, scheme: QuantScheme, p: float = 2.0, num_candidates: int = 100) -> None:
        super().__init__(scheme)
        if not p > 0:
            raise ConfigError(f"mse observer needs a positive norm exponent p, got {p!r}.")
        if not 1 <= num_candidates <= round(1 / STEP):
            raise ConfigError(f"mse observer num_candidates must be 1 to {round(1 / STEP)}, got {num_candidates!r}.")
        self.p = float(p)
        self.num_candidates = int(num_candidates)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().batch_range(x)
        rows = x.reshape(1, -1) if self.ch_axis is None else channels_first(x, self.ch_axis)
        axis = None if self.ch_axis is None else 0
        best_error = torch.full_like(lo, float("inf"))
        best_factor = torch.ones_like(lo)
        for i in range(self.num_candidates):
            factor = 1.0 - STEP * i
            scale, zero_point = self.scheme.qparams(lo * factor, hi * factor)
            xq = fake_quantize(rows, scale, zero_point, self.scheme.qmin, self.scheme.qmax, axis, exact=True)
            error = (xq - rows).abs().pow(self.p).mean(dim=1).reshape(lo.shape)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_factor = torch.where(better, torch.full_like(lo, factor), best_factor)
        return lo * best_factor, hi * best_factor

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        # Called before forward() counts the batch: num_batches batches are already in the mean.
        n = float(self.num_batches.item()) + 1
        self.min_val = self.min_val + (lo - self.min_val) / n
        self.max_val = self.max_val + (hi - self.max_val) / n

    def merge_ranks(self, counts: list[int], source: int, group: dist.ProcessGroup | None) -> None:
        n = counts[dist.get_rank(group)]
        total = sum(counts)
        for name in ("min_val", "max_val"):
            weighted = self._buffers[name].double() * n if n else torch.zeros_like(self._buffers[name], torch.float64)
            dist.all_reduce(weighted, group=group)
            self._buffers[name] = (weighted / total).to(torch.float32)
