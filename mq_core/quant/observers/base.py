"""Observer: accumulates statistics of the tensors a quantizer sees and turns them into a range [lo, hi].

All state lives in buffers so that ``state_dict`` round-trips a calibrated model. Buffers whose shape depends on
the data (per-channel ranges, histograms) start empty and are resized when a state dict is loaded. Buffers are
registered in ``__init__`` and reassigned afterwards: ``Observer.reset`` restores each one's registered value.

Across ``torch.distributed`` ranks, ``Observer.sync`` merges the statistics of every rank into each (calibration
calls it on every observer, see ``mq_core.pipeline.calibrate``): each class says how its buffers merge
(``merge_rules``, or its own ``merge_ranks``), so that the merged state is the one a single process would hold
after seeing every rank's data.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from mq_core.errors import SchemeError
from mq_core.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

#: ``merge_rules`` values: the all-reduce op of each rule, and the value a rank without data contributes.
_REDUCE_OPS = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def _neutral(rule: str, dtype: torch.dtype) -> float | int:
    """The value that leaves a ``rule`` all-reduce unchanged (what a rank that saw no data contributes)."""
    if rule == "sum":
        return 0
    big = torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max
    return big if rule == "min" else -big


def channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    """View ``x`` as [C, N]: channel ``axis`` first, everything else flattened."""
    return x.transpose(0, axis % x.dim()).reshape(x.shape[axis], -1)


class Observer(nn.Module):
    """Base class: subclasses implement ``observe`` (update buffers) and ``compute_range``.

    ``per_channel_supported`` says whether the estimator means anything per channel; asking for per-channel on
    one that does not raises at construction.
    """

    per_channel_supported: ClassVar[bool] = True
    #: How ``sync`` merges each buffer across ranks: ``"min"``, ``"max"`` or ``"sum"`` (an element-wise all-reduce).
    #: A buffer without a rule is taken from the first rank that observed data (``merge_ranks``).
    merge_rules: ClassVar[dict[str, str]] = {}
    #: Classes already warned about buffers without a merge rule (one warning per class, not per quantizer).
    _warned_unmerged: ClassVar[set[type]] = set()

    def __init__(self, scheme: QuantScheme, **options: Any) -> None:
        super().__init__()
        if options:
            raise SchemeError(f"{type(self).__name__} got unknown options {sorted(options)}.")
        if scheme.per_channel and not self.per_channel_supported:
            raise SchemeError(
                f"observer {type(self).__name__} works per-tensor only; use minmax, ema_minmax, mse or clip_std "
                "for per-channel quantization."
            )
        self.scheme = scheme
        #: each buffer's value when it was registered: what ``reset`` returns to
        self._initial_buffers: dict[str, torch.Tensor] = {}
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))

    @property
    def ch_axis(self) -> int | None:
        return self.scheme.ch_axis if self.scheme.per_channel else None

    @property
    def observed(self) -> bool:
        return bool(self.num_batches.item() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        with torch.no_grad():
            self.observe(x.detach().to(torch.float32))
        self.num_batches += 1
        return x

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        # nn.Module.__setattr__ re-registers a buffer on every assignment (self.min_val = ...): keep the first value
        if tensor is not None and name not in self._initial_buffers:
            self._initial_buffers[name] = tensor.detach().clone()

    def reset(self) -> None:
        """Forget everything observed: every buffer back to its registered value, as if freshly built.
        ``mq.calibrate`` starts from here by default, so a second calibration does not silently extend the first."""
        for name, initial in self._initial_buffers.items():
            current = self._buffers.get(name)
            device = current.device if current is not None else initial.device
            self._buffers[name] = initial.to(device=device, copy=True)

    # --- across ranks ---------------------------------------------------------------------------------------------
    def sync(self, group: dist.ProcessGroup | None = None) -> None:
        """Merge the statistics of every rank of ``group`` (default: the world) into this observer, on every rank.

        A collective: every rank of the group calls it, for the same observers in the same order. Ranks that saw
        no data (an empty shard, a branch their data never took) take the buffer shapes of the first rank that did
        and contribute nothing; ``num_batches`` becomes the total over the ranks. Subclasses say how their
        buffers merge with ``merge_rules`` or by overriding ``merge_ranks``; what the built-in observers
        synchronise is listed in docs/algorithms.md ("Distributed calibration and QAT").
        """
        counts = gather_ranks(self.num_batches.reshape(1), group)
        observed = [int(c) for c in torch.cat(counts).tolist()]
        if not any(observed):
            return
        source = next(rank for rank, n in enumerate(observed) if n)
        if not all(observed):
            self._adopt_shapes(source, group)
        self.merge_ranks(observed, source, group)
        self.num_batches.fill_(sum(observed))

    def merge_ranks(self, counts: list[int], source: int, group: dist.ProcessGroup | None) -> None:
        """Merge the data-dependent buffers across ranks (``sync``'s step; ``num_batches`` is done after it).

        ``counts[r]`` is the number of batches rank ``r`` (its rank in ``group``) observed, ``source`` the first
        rank with data. The default all-reduces each buffer named in ``merge_rules`` (a rank without data
        contributes the rule's neutral value) and broadcasts every other persistent buffer from ``source``, with
        a warning: such a buffer then holds one rank's statistics, identical everywhere but not merged.
        """
        rank = dist.get_rank(group)
        unmerged = []
        for name, buf in self.named_buffers(recurse=False):
            if name == "num_batches" or name in self._non_persistent_buffers_set:
                continue
            rule = self.merge_rules.get(name)
            if rule is None:
                unmerged.append(name)
                dist.broadcast(buf, dist.get_global_rank(_group(group), source), group=group)
                continue
            if not counts[rank]:
                buf.fill_(_neutral(rule, buf.dtype))
            dist.all_reduce(buf, _REDUCE_OPS[rule], group=group)
        if unmerged and type(self) not in Observer._warned_unmerged:
            Observer._warned_unmerged.add(type(self))
            log.warning("observer %s has no merge rule for %s: every rank takes them from the first rank with data, "
                        "so its qparams are identical across ranks but come from that rank's data only (set "
                        "merge_rules or override merge_ranks).", type(self).__name__, ", ".join(unmerged))

    def _adopt_shapes(self, source: int, group: dist.ProcessGroup | None) -> None:
        """On a rank without data, resize the data-dependent buffers (empty until the first batch) to ``source``'s
        shapes, so that every rank all-reduces tensors of one shape."""
        shapes: list[Any] = [{name: tuple(buf.shape) for name, buf in self.named_buffers(recurse=False)}]
        dist.broadcast_object_list(shapes, dist.get_global_rank(_group(group), source), group=group)
        for name, shape in shapes[0].items():
            buf = self._buffers[name]
            if buf is not None and tuple(buf.shape) != shape:
                self._buffers[name] = torch.zeros(shape, dtype=buf.dtype, device=buf.device)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range [lo, hi] (per channel when per-channel) that qparams are computed from."""
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.compute_range()
        return self.scheme.qparams(lo, hi)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Data-dependent buffers (per-channel ranges, histograms) are empty until the first batch: take the
        # saved shape so a fresh prepare() can load a calibrated checkpoint.
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, batches={int(self.num_batches)}"


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or the default (world) group for None."""
    return group if group is not None else dist.group.WORLD


def gather_ranks(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group-rank order."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out
