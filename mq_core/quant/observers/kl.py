"""KL observer: TensorRT's entropy calibration ("8-bit Inference with TensorRT", Migacz, GTC 2017).

The threshold is the one whose clipped-and-quantized distribution of ``|x|`` loses the least information
(smallest KL divergence) relative to the clipped distribution: unlike a fixed percentile it adapts to how heavy
the tail is, which is why it is TensorRT's default for activations.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist

from mq_core.errors import ConfigError
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.scheme import QuantScheme

#: Count given to empty bins before taking logs (MXNet/ONNX Runtime's ``_smooth_distribution``).
SMOOTHING = 1e-4
#: Thresholds evaluated at once: [CHUNK, bins] float64 work arrays of at most 4 MB each for 2048 bins.
CHUNK = 256
#: A value that occurs this many times exactly in one batch is a point mass (an "atom"), not density: see
#: ``atom_histogram``. Continuous data repeats a float32 value by chance far less often.
ATOM_REPEATS = 16


def magnitude_histogram(values: torch.Tensor, limit: torch.Tensor, bins: int) -> torch.Tensor:
    """float64 counts of ``values`` (>= 0) in ``bins`` equal bins over [0, limit]; everything in bin 0 if limit is 0."""
    per_unit = bins / limit if limit > 0 else torch.zeros_like(limit)
    index = torch.floor(values * per_unit).clamp_(0, bins - 1).long()
    return torch.bincount(index, minlength=bins).to(torch.float64)


def rebin(hist: torch.Tensor, old_limit: torch.Tensor, new_limit: torch.Tensor) -> torch.Tensor:
    """Move a histogram over [0, old_limit] onto the same number of bins over [0, new_limit >= old_limit].

    Mass is taken as uniform inside each old bin: new bin counts are differences of the old histogram's
    piecewise-linear CDF at the new edges, so the total count is preserved.
    """
    bins = hist.numel()
    if old_limit == new_limit:
        return hist
    if old_limit == 0:
        moved = torch.zeros_like(hist)
        moved[0] = hist.sum()
        return moved
    edges = torch.arange(bins + 1, dtype=torch.float64, device=hist.device) * (float(new_limit) / float(old_limit))
    edges = edges.clamp_(max=bins)
    k = edges.floor().long().clamp_(max=bins - 1)
    below = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    cdf = below[k] + (edges - k) * hist[k]
    return cdf.diff()


def atom_histogram(x: torch.Tensor, limit: torch.Tensor, bins: int) -> torch.Tensor:
    """float64 counts, binned like ``magnitude_histogram``, of the values of ``x`` that occur ``ATOM_REPEATS`` times or
    more exactly: point masses of the distribution.

    Real networks' tensors carry them besides a density: the exact zeros of ReLU outputs and zero padding, ReLU6's
    6.0 where it saturates, the constant ``ReLU6(bias)`` of a channel whose input is dead (on EfficientNet-Lite0 up
    to a quarter of a late depthwise output), inputs on an 8-bit pixel grid. Quantization keeps an atom an atom (it
    moves by at most half a step), but the search's Q spreads each level's count evenly over its bins, so an atom
    inside a level costs divergence as if information were lost, the more the wider the levels: the search then
    prefers small thresholds that isolate atoms, and clipped ReLU6 outputs from 6 to about 4 (-20 dB on those
    tensors). ``compute_range`` leaves atoms out of the shape comparison and keeps them where it matters, in the
    clipped mass. The zeros' spike is the largest case (it made every post-ReLU tensor clip to 1/8 of its range).
    """
    values, counts = torch.unique(x.flatten(), return_counts=True)
    atoms = counts >= ATOM_REPEATS
    per_unit = bins / limit if limit > 0 else torch.zeros_like(limit)
    index = torch.floor(values[atoms].abs() * per_unit).clamp_(0, bins - 1).long()
    return torch.bincount(index, weights=counts[atoms].to(torch.float64), minlength=bins).to(torch.float64)


def _smooth(dist: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give empty valid bins ``SMOOTHING`` counts, taken evenly from the non-empty ones (rows of [T, B]).

    Returns the smoothed rows and whether each row had any mass. Fractional counts (left by re-binning) are
    floored at ``SMOOTHING`` so no bin goes negative.
    """
    nonzero = dist > 0
    n_nonzero = nonzero.sum(dim=1, keepdim=True)
    n_zero = valid.sum(dim=1, keepdim=True) - n_nonzero
    taken = SMOOTHING * n_zero.to(dist.dtype) / n_nonzero.clamp(min=1)
    empty = valid.to(dist.dtype) * SMOOTHING
    return torch.where(nonzero, (dist - taken).clamp(min=SMOOTHING), empty), n_nonzero.squeeze(1) > 0


def kl_divergences(hist: torch.Tensor, levels: int, total: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P || Q) for every threshold i = levels .. bins (i bins kept); entry ``j`` is threshold ``levels + j``.

    Per threshold i: P is ``hist[:i]`` with the outliers ``total[i:]`` (``total`` defaults to ``hist``; the KL
    observer passes the histogram with its atoms, ``hist`` without them) added to its last bin; Q merges
    ``hist[:i]`` (outliers excluded, so clipping is penalised) into ``levels`` groups, bin ``j`` in group
    ``floor(j * levels / i)`` (``i / levels`` bins per level, as on the grid that amax = i bins gives; NVIDIA
    pytorch-quantization's ``linspace`` grouping), and spreads each group's count evenly over the group's bins
    where P is non-zero (zeros preserved). Both are smoothed; a Q without mass scores infinity.

    MXNet and ONNX Runtime instead merge ``i // levels`` bins per group and give the last group the remainder (up
    to ``levels - 1`` extra bins). That grid is finer than the real one everywhere but in the tail, so the
    divergence dips just below every multiple of ``levels`` and those thresholds won whatever the data.

    Vectorised over chunks of CHUNK thresholds: group sums and non-zero counts are scattered from the bins, only
    the first ``max(i)`` columns of a chunk are touched, and the rows are never normalised:
    ``KL = sum(a log(a / b)) / A + log(B / A)`` for row sums A, B.
    """
    bins = hist.numel()
    total_below = torch.cat([hist.new_zeros(1), (hist if total is None else total).cumsum(0)])
    out = []
    for kept in torch.arange(levels, bins + 1, device=hist.device).split(CHUNK):
        width = int(kept[-1])
        i = kept[:, None]
        position = torch.arange(width, device=hist.device)
        valid = position < i
        outliers = total_below[-1] - total_below[kept]
        kept_hist = torch.where(valid, hist[:width], 0.0)
        p = kept_hist.clone().scatter_add_(1, i - 1, outliers[:, None])
        nonzero = p > 0
        group = (position * levels // i).clamp_(max=levels - 1)  # columns past i are masked out
        group_sum = kept_hist.new_zeros(len(kept), levels).scatter_add_(1, group, kept_hist)
        group_nonzero = kept_hist.new_zeros(len(kept), levels).scatter_add_(1, group, nonzero.to(torch.float64))
        share = group_sum / group_nonzero.clamp(min=1)
        q = torch.where(nonzero, share.gather(1, group), 0.0)
        a, _ = _smooth(p, valid)
        b, q_has_mass = _smooth(q, valid)
        mass_a, mass_b = a.sum(dim=1), b.sum(dim=1)
        kl = torch.where(valid, a * torch.log(a / b), 0.0).sum(dim=1) / mass_a + torch.log(mass_b / mass_a)
        out.append(torch.where(q_has_mass, kl, torch.inf))
    return torch.cat(out)


class KLObserver(MinMaxObserver):
    """Entropy-calibrated per-tensor range from a histogram of ``|x|`` accumulated over all batches.

    The histogram covers [0, running max |x|] in ``bins`` bins; when a batch exceeds the range, the accumulated
    histogram is re-binned into the wider range (uniform mass inside old bins) before the batch is added.

    Choices, documented because implementations differ:

    * quantized levels spent on [0, amax]: ``2**(bits-1)`` for signed symmetric grids (128 for int8, as
      TensorRT), ``2**bits`` for unsigned symmetric ones; for affine grids ``2**bits`` when every value seen is
      >= 0, else ``2**(bits-1)`` (the histogram folds both signs onto |x|; exact for a balanced range, coarser
      than the real grid on the longer side of a lopsided one, see docs/algorithms.md).
    * amax = ``i * bin_width``, the upper edge of the last kept bin, i.e. exactly the range P was built on
      (MXNet, ONNX Runtime and pytorch-quantization; the GTC slides' ``(i + 0.5) * width`` differs by half a bin).
    * ties pick the largest threshold (clip as little as the divergence allows).
    * atoms (values repeated exactly, ``atom_histogram``: the zeros of ReLU outputs and padding, saturated ReLU6,
      dead channels' constants) are left out of P and Q and counted only when clipped: quantization moves an atom by
      at most half a step, so only clipping it loses anything.
    * returned range: [-amax, amax] signed symmetric, [0, amax] unsigned symmetric, and for affine grids the
      seen range clipped to amax, ``[max(min_seen, -amax), min(max_seen, amax)]``.

    Per-channel is not supported: a 2048-bin histogram per channel is costly, and a weight channel has too few
    elements to fill one.

    Args:
        bins: histogram bins; must be at least the number of quantized levels (2**bits covers every case).
    """

    per_channel_supported: ClassVar[bool] = False

    def __init__(self, scheme: QuantScheme, bins: int = 2048) -> None:
        super().__init__(scheme)
        if bins < 2**scheme.bits:
            raise ConfigError(
                f"kl observer needs at least 2**bits = {2**scheme.bits} histogram bins for {scheme.describe()}, "
                f"got bins={bins!r}."
            )
        self.bins = int(bins)
        self.register_buffer("histogram", torch.empty(0, dtype=torch.float64))
        #: the part of ``histogram`` that is atoms (same bins)
        self.register_buffer("atoms", torch.empty(0, dtype=torch.float64))

    def _limit(self) -> torch.Tensor:
        return torch.maximum(-self.min_val, self.max_val)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # checkpoints written before atoms were kept apart: no atoms known, the search treats all as density
        if prefix + "histogram" in state_dict and prefix + "atoms" not in state_dict:
            state_dict[prefix + "atoms"] = torch.zeros_like(state_dict[prefix + "histogram"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def merge_ranks(self, counts: list[int], source: int, group: dist.ProcessGroup | None) -> None:
        """Across ranks: a common range first (min/max all-reduced, so the limit is the largest rank's), then each
        rank's histogram re-binned onto it (``rebin``, as ``observe`` does when the range grows) and the
        histograms summed. One process re-bins as its range grows batch by batch instead, so the merged histogram
        differs from its by the uniform-mass assumption inside old bins, and the threshold by a few bins."""
        observed = bool(counts[dist.get_rank(group)])
        local_limit = self._limit()
        if not observed:  # a rank without data: shapes from the source rank, nothing to add
            self.min_val.fill_(float("inf"))
            self.max_val.fill_(float("-inf"))
            self.histogram.zero_()
            self.atoms.zero_()
        dist.all_reduce(self.min_val, dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max_val, dist.ReduceOp.MAX, group=group)
        if observed:
            self.histogram = rebin(self.histogram, local_limit, self._limit())
            self.atoms = rebin(self.atoms, local_limit, self._limit())
        dist.all_reduce(self.histogram, group=group)
        dist.all_reduce(self.atoms, group=group)

    def observe(self, x: torch.Tensor) -> None:
        old_limit = self._limit() if self.observed else None
        super().observe(x)
        limit = self._limit()
        counts = magnitude_histogram(x.abs().flatten(), limit, self.bins)
        atoms = atom_histogram(x, limit, self.bins)
        if old_limit is not None:
            counts += rebin(self.histogram, old_limit, limit)
            atoms += rebin(self.atoms, old_limit, limit)  # rebin is linear: the atoms stay the same part of counts
        self.histogram, self.atoms = counts, atoms

    def quant_levels(self) -> int:
        """Grid levels available to [0, amax] (see the class docstring)."""
        s = self.scheme
        full = (not s.signed) if s.symmetric else bool(self.min_val >= 0)
        return 2**s.bits if full else 2 ** (s.bits - 1)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.quant_levels()
        density = (self.histogram - self.atoms).clamp_(min=0)
        divergences = kl_divergences(density, levels, total=self.histogram)
        best = divergences.numel() - 1 - int(torch.argmin(divergences.flip(0)))
        amax = (self._limit() * ((levels + best) / self.bins)).to(torch.float32)
        if not self.scheme.symmetric:
            return torch.maximum(self.min_val, -amax), torch.minimum(self.max_val, amax)
        return (-amax if self.scheme.signed else torch.zeros_like(amax)), amax
