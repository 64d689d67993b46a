"""FakeQuantizer: the module that simulates one quantized tensor.

A fake quantizer owns the tensor's qparams (``scale``/``zero_point`` buffers), an observer, and two switches:
*observe* (feed the observer, refresh qparams) and *quantize* (replace x by its quantize-dequantize image). The
calibration API flips the switches for a whole model; learnable quantizers (mq-algos) subclass this and override
``quantize_forward`` and ``export_qparams``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mq_core.errors import CalibrationError
from mq_core.quant.functional import fake_quantize
from mq_core.quant.observers.base import Observer
from mq_core.quant.scheme import QuantScheme


class FakeQuantizer(nn.Module):
    """Base fake quantizer with fixed (observer-derived) qparams.

    Args:
        scheme: the integer grid.
        observer: the range estimator used while observing; ``None`` for quantizers whose qparams are set
            directly (e.g. loaded from a checkpoint or learned).
        exact: divide by the scale (bit-exact with ONNX Runtime/TVM) instead of torch's multiply-by-inverse
            kernels; see ``mq_core.quant.functional``.
    """

    #: Tracing never enters a fake quantizer (see mq_core.graph.capture).
    mq_leaf = True

    def __init__(self, scheme: QuantScheme, observer: Observer | None = None, exact: bool = True) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer = observer
        self.exact = exact
        #: qualified name inside the prepared model, set by prepare(); used in error messages.
        self.qname = "<unnamed quantizer>"
        #: "weight" or "activation"; the calibration API switches the two groups separately.
        self.role = "activation"
        #: name of the quantized tensor (the producing fx node), set by placement; names it in exports.
        self.tensor = ""
        #: the layer whose qconfig this quantizer follows (mq_core.graph.layer_qconfig), set by prepare()
        self.layer = ""
        shape = ()
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observe_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("quant_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))

    # --- properties -----------------------------------------------------------------------------------------
    @property
    def ch_axis(self) -> int | None:
        return self.scheme.ch_axis if self.scheme.per_channel else None

    @property
    def is_calibrated(self) -> bool:
        return bool(self.calibrated.item())

    @property
    def normalizes_input(self) -> bool:
        """Whether the output ignores the input's scale (DoReFa maps every weight onto [-1, 1]), so that a BN
        fold factor applied before quantizing would be normalised away; QAT BN layers then fold *after* this
        quantizer (``mq_core.nn.qat``), which needs its output on a grid of ``scale`` with zero point 0."""
        return False

    # --- switches ---------------------------------------------------------------------------------------------
    def enable_observation(self, on: bool = True) -> None:
        if not on and self.observe_enabled.item() and self.observer is not None and self.observer.observed:
            self.update_qparams()
        self.observe_enabled.fill_(int(on))

    def enable_quantization(self, on: bool = True) -> None:
        self.quant_enabled.fill_(int(on))

    # --- qparams --------------------------------------------------------------------------------------------
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install qparams (resizing the buffers for per-channel) and mark the quantizer calibrated."""
        scale = scale.detach().to(torch.float32)
        zero_point = zero_point.detach().to(torch.int32)
        if self.scale.shape != scale.shape:
            self.scale = torch.empty_like(scale)
            self.zero_point = torch.empty_like(zero_point)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrated.fill_(1)

    def reset(self) -> None:
        """Forget the calibration: the observer's statistics and the ``calibrated`` mark (the switches stay as they
        are). A quantizer without an observer keeps its qparams: they were set directly, not observed."""
        if self.observer is None:
            return
        self.observer.reset()
        self.calibrated.fill_(0)

    def update_qparams(self) -> None:
        if self.observer is None or not self.observer.observed:
            raise CalibrationError(f"quantizer {self.qname} has seen no data; run mq.calibrate first.")
        self.set_qparams(*self.observer.calculate_qparams())

    def export_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed (scale, zero_point) this quantizer is equivalent to at deploy time."""
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe_enabled.item():
            self._observe(x)
        if not self.quant_enabled.item():
            return x
        if not self.calibrated.item():
            raise CalibrationError(
                f"quantizer {self.qname} is enabled but was never calibrated; call mq.calibrate(qmodel, data) "
                "before running the quantized model."
            )
        return self.quantize_forward(x)

    def _observe(self, x: torch.Tensor) -> None:
        if self.observer is None:
            return
        if x.numel() and not torch.isfinite(x.detach()).all():
            raise CalibrationError(
                f"quantizer {self.qname} saw NaN or Inf during calibration; the calibration data (or the float "
                "model on it) produces non-finite values. Check the inputs and the float model's outputs."
            )
        self.observer(x)
        if self.quant_enabled.item():
            self.update_qparams()

    def quantize_forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(
            x, self.scale, self.zero_point, self.scheme.qmin, self.scheme.qmax, self.ch_axis, self.exact
        )

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any):  # type: ignore[override]
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != self._buffers[name].shape:
                current = self._buffers[name]  # keep the module's device: a CPU checkpoint loads into a CUDA model
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        flags = f"observe={'on' if self.observe_enabled.item() else 'off'}, "
        flags += f"quantize={'on' if self.quant_enabled.item() else 'off'}"
        text = f"{self.scheme.describe()}, {state}, {flags}, rounding={'exact' if self.exact else 'fast'}"
        if self.is_calibrated:
            s = self.scale
            text += f", scale={s.item():.6g}" if s.numel() == 1 else f", scale=[{s.min():.4g}..{s.max():.4g}]"
            if not self.scheme.symmetric:
                z = self.zero_point
                text += f", zero_point={int(z.item())}" if z.numel() == 1 else f", zero_point=[{z.min()}..{z.max()}]"
        return text


class FixedFakeQuantizer(FakeQuantizer):
    """The ``fixed`` quantizer: qparams come from the observer and are never learned (STE gradient for x)."""
