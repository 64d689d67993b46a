"""What every learnable fake quantizer shares: STE helpers, per-channel plumbing and the deploy-exact eval path.

A learnable quantizer computes its *paper* forward while training (``surrogate``: the quantized value with the
paper's gradients), and in eval mode the value the deploy view will compute: ``fake_quantize`` with the fixed
qparams of ``export_qparams()``, the very function the deploy view runs, so eval output equals the exported
model's bit for bit *by construction*. Where the paper's forward is not a uniform integer grid with an integer
zero point (LSQ+'s float offset, DSQ's float lower bound) the two differ by the snapping that export needs; the
eval path keeps the surrogate's gradients (``hard + (y - y.detach())``, exact in value) so methods that optimise
quantizer parameters on a model in eval mode (BRECQ-style reconstruction) still learn.

The learned tensors are ``nn.Parameter`` s (fixed ones buffers) registered under their own names; the base
``scale``/``zero_point`` buffers are removed where they would only hold stale copies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mq_core import FakeQuantizer, SchemeError
from mq_core.plugin_api import SCALE_EPS, Observer, QuantScheme, fake_quantize


class RoundSTE(torch.autograd.Function):
    """``round`` (half to even, as every runtime) with the straight-through gradient 1."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class ClampMinSTE(torch.autograd.Function):
    """``max(t, floor)`` whose gradient passes through unchanged, so a parameter pushed below ``floor`` by one
    step still gets gradients and can come back (a plain clamp would freeze it there for good)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, floor: float) -> torch.Tensor:  # type: ignore[override]
        return torch.clamp(t, min=floor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def positive(t: torch.Tensor, floor: float = SCALE_EPS) -> torch.Tensor:
    """A learnable step size kept at or above ``floor`` (see ``ClampMinSTE``)."""
    return ClampMinSTE.apply(t, floor)


def reduce_to(grad: torch.Tensor, param: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum an elementwise gradient down to ``param``'s shape (all elements, or all but the channel axis)."""
    if axis is None or param.dim() == 0:
        return grad.sum().reshape(param.shape)
    axis = axis % grad.dim()
    dims = [d for d in range(grad.dim()) if d != axis]
    return grad.sum(dim=dims).reshape(param.shape) if dims else grad.reshape(param.shape)


def elements_per_scale(x: torch.Tensor, axis: int | None, ranks: int = 1) -> int:
    """N of LSQ's gradient scale: the elements one scale value quantizes (per channel when per-channel), in the
    global batch: ``ranks`` data-parallel ranks each hold a share ``x`` of it (``LearnableFakeQuantizer.batch_ranks``).
    """
    if axis is None:
        return max(x.numel() * ranks, 1)
    return max(x.numel() // x.shape[axis] * ranks, 1)


class LearnableFakeQuantizer(FakeQuantizer):
    """Base of the quantizers whose qparams are trained (LSQ, LSQ+, PACT, DSQ, APoT).

    Subclasses implement ``surrogate`` (the paper's forward and gradients), ``set_qparams`` (turn the observer's
    qparams into initial parameter values) and ``export_qparams`` (the fixed grid they are equivalent to).

    Create the optimizer *after* ``mq.calibrate``: calibration resizes per-channel parameters (a new
    ``nn.Parameter`` replaces the scalar placeholder).
    """

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True) -> None:
        super().__init__(scheme, observer, exact)
        if scheme.pot_scale:
            raise SchemeError(
                f"{type(self).__name__} learns its scale, which is then not a power of two; use the 'fixed' "
                f"quantizer for power-of-two grids ({scheme.describe()})."
            )
        del self._buffers["scale"], self._buffers["zero_point"]

    # --- subclass interface ---------------------------------------------------------------------------------
    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's training-time forward, carrying the paper's gradients."""
        raise NotImplementedError

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def batch_ranks(self) -> int:
        """How many data-parallel ranks share the batch this quantizer sees: for an activation quantizer running
        inside a DistributedDataParallel forward, the size of its process group (DDP splits the global batch across
        the ranks), else 1; a weight is whole on every rank. Gradient scales that count the batch (LSQ's N) use
        it, so N ranks on shares of a batch take the step one process takes on the whole batch. The running DDP
        module is what torch itself tells TorchDynamo (``_get_active_ddp_module``); a torch without it gives 1."""
        if self.role == "weight" or not dist.is_available() or not dist.is_initialized():
            return 1
        active = getattr(DistributedDataParallel, "_get_active_ddp_module", lambda: None)()
        return 1 if active is None else dist.get_world_size(active.process_group)

    # --- forward --------------------------------------------------------------------------------------------
    def quantize_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.surrogate(x)
        scale, zero_point = self.export_qparams()
        hard = fake_quantize(x.detach(), scale.to(x.device), zero_point.to(x.device), self.scheme.qmin,
                             self.scheme.qmax, self.ch_axis, self.exact)
        if not torch.is_grad_enabled():
            return hard
        y = self.surrogate(x)
        return hard + (y - y.detach())

    # --- parameters -----------------------------------------------------------------------------------------
    def _assign(self, name: str, value: torch.Tensor, learnable: bool = True) -> None:
        """Set parameter (or buffer, when not ``learnable``) ``name`` to ``value``; a new shape (per-channel
        calibration) installs a new tensor, an equal one is updated in place (optimizers keep tracking it)."""
        value = value.detach()
        current = getattr(self, name, None)
        if isinstance(current, torch.Tensor) and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value.to(current.dtype))
            return
        dtype = current.dtype if isinstance(current, torch.Tensor) else torch.float32
        value = value.to(dtype).clone()
        if learnable:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any):  # type: ignore[override]
        # Per-channel tensors are scalars until calibration: take the saved shape so a fresh prepare() loads a
        # trained checkpoint. FakeQuantizer's own hook assumes ``scale``/``zero_point`` buffers, which these
        # classes replace, so it is skipped on purpose.
        for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
            key = prefix + name
            if tensor is not None and key in state_dict and state_dict[key].shape != tensor.shape:
                self._assign(name, torch.empty_like(state_dict[key], dtype=tensor.dtype, device=tensor.device),
                             learnable=name in self._parameters)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        text = f"{self.scheme.describe()}, {state}, observe={'on' if self.observe_enabled.item() else 'off'}, "
        text += f"quantize={'on' if self.quant_enabled.item() else 'off'}"
        if self.is_calibrated:
            for name, p in self.named_parameters(recurse=False):
                text += f", {name}={p.item():.6g}" if p.numel() == 1 else f", {name}=[{p.min():.4g}..{p.max():.4g}]"
        return text
