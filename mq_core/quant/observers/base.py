"""Observer: accumulates statistics of the tensors a quantizer sees and turns them into a range [lo, hi].

All state lives in buffers so that ``state_dict`` round-trips a calibrated model. Buffers whose shape depends on
the data (per-channel ranges, histograms) start empty and are resized when a state dict is loaded. Buffers are
registered in ``__init__`` and reassigned afterwards: ``Observer.reset`` restores each one's registered value.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mq_core.errors import SchemeError
from mq_core.quant.scheme import QuantScheme


def channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    """View ``x`` as [C, N]: channel ``axis`` first, everything else flattened."""
    return x.transpose(0, axis % x.dim()).reshape(x.shape[axis], -1)


class Observer(nn.Module):
    """Base class: subclasses implement ``observe`` (update buffers) and ``compute_range``.

    ``per_channel_supported`` says whether the estimator means anything per channel; asking for per-channel on
    one that does not raises at construction.
    """

    per_channel_supported: ClassVar[bool] = True

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
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, batches={int(self.num_batches)}"
