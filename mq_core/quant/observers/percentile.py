"""Percentile observer: clip at the p-th percentile of each batch, averaged across batches (MQBench's EMA quantile).

Clipping the rare extreme values buys resolution for the bulk of an activation distribution, which usually matters
more than representing a handful of outliers exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mq_core.errors import ConfigError
from mq_core.quant.observers.base import channels_first
from mq_core.quant.observers.minmax import EMAMinMaxObserver
from mq_core.quant.scheme import QuantScheme


def histogram_quantiles(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fractions: Sequence[float], bins: int
) -> torch.Tensor:
    """Quantiles of every row of ``rows`` [C, N] from a ``bins``-bin histogram over [lo, hi] (shape [C]).

    Returns [len(fractions), C]. Inside the bin holding the quantile the mass is taken as uniform (linear
    interpolation), so the error is a small fraction of one bin width, ``(hi - lo) / bins``. One ``bincount``
    over ``channel * bins + bin`` builds all channels' histograms at once.
    """
    channels, n = rows.shape
    width = (hi - lo) / torch.full_like(hi, bins)  # a true division on CUDA too (see QuantScheme.qparams)
    safe_width = torch.where(width > 0, width, torch.ones_like(width))
    index = torch.floor((rows - lo[:, None]) / safe_width[:, None]).clamp_(0, bins - 1).long()
    index += torch.arange(channels, device=rows.device)[:, None] * bins
    counts = torch.bincount(index.flatten(), minlength=channels * bins).reshape(channels, bins)
    cdf = counts.cumsum(dim=1)
    out = []
    for fraction in fractions:
        target = fraction * n
        k = (cdf < target).sum(dim=1, keepdim=True).clamp_(max=bins - 1)
        in_bin = counts.gather(1, k)
        below = cdf.gather(1, k) - in_bin
        within = ((target - below) / in_bin.clamp(min=1)).clamp(0, 1)
        out.append(lo + (k.squeeze(1) + within.squeeze(1)) * width)
    return torch.stack(out)


class PercentileObserver(EMAMinMaxObserver):
    """Per-batch percentile range, exponentially averaged across batches like ``EMAMinMaxObserver``.

    Symmetric schemes clip ``|x|`` at its ``percentile``-th percentile ``a`` (range [-a, a], or [0, a] unsigned);
    affine schemes clip both tails, at the ``100 - percentile`` and ``percentile`` percentiles of ``x``.

    Args:
        percentile: in (0, 100]; 100 reproduces (EMA) min/max up to the histogram resolution.
        bins: histogram bins per batch (and per channel); the quantile is accurate to a fraction of
            ``range / bins``.
        averaging_constant: EMA weight of the newest batch, ``m <- (1 - c) m + c * current``.

    Each batch's histogram is used for that batch's quantiles and dropped; what is kept, and merged across ranks
    (``sync``), is the EMA of the per-batch ranges, exactly as ``EMAMinMaxObserver`` merges it.
    """

    def __init__(
        self, scheme: QuantScheme, percentile: float = 99.99, bins: int = 2048, averaging_constant: float = 0.1
    ) -> None:
        super().__init__(scheme, averaging_constant=averaging_constant)
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile!r}.")
        if bins < 1:
            raise ConfigError(f"percentile observer needs at least one histogram bin, got bins={bins!r}.")
        self.percentile = float(percentile)
        self.bins = int(bins)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(1, -1) if self.ch_axis is None else channels_first(x, self.ch_axis)
        shape = () if self.ch_axis is None else (rows.shape[0],)
        q = self.percentile / 100
        if self.scheme.symmetric:
            magnitude = rows.abs()
            zero = torch.zeros(rows.shape[0], device=rows.device)
            hi = histogram_quantiles(magnitude, zero, magnitude.amax(dim=1), [q], self.bins)[0]
            lo = -hi if self.scheme.signed else zero
        else:
            lo, hi = histogram_quantiles(rows, *torch.aminmax(rows, dim=1), [1 - q, q], self.bins)
        return lo.reshape(shape), hi.reshape(shape)
