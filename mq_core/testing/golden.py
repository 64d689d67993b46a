"""A tiny model and helpers for golden-file tests: exact expected artifacts, written out by hand.

A golden test prepares a model small enough that every number of the exported file can be worked out by hand,
sets every quantizer's scale and zero point by hand, exports, and compares the file with the expected text. mq's
own backend tests do this, and plugin authors can do the same for their exporters::

    import torch
    import mq_core as mq
    from mq_core.testing.golden import TinyNet, set_qparams, tiny_inputs

    torch.manual_seed(0)  # the default weights are torch's random initialisation
    qmodel = mq.prepare(TinyNet().eval(), "my-backend", tiny_inputs())
    mq.calibrate(qmodel, [tiny_inputs()], progress=False)
    set_qparams(qmodel, {"x_fq": (0.1, 3), "conv.weight_fake_quant": ([0.0078125, 0.015625], 0),
                         "conv_fq": (0.05, 0), "fc.weight_fake_quant": ([0.25, 0.5], 0), "fc_fq": (0.125, 128)})
    result = mq.export(qmodel, tiny_inputs(), tmp_path / "out")
    assert result.path("my-format").read_text() == EXPECTED

``golden_export`` does the prepare -> calibrate -> set_qparams -> export steps in one call.

``TinyNet`` is Conv2d -> ReLU -> flatten -> Linear, with submodules ``conv``, ``relu`` (``flatten``) and ``fc``.
Its flatten is either ``torch.flatten(x, 1)`` (a ``call_function`` fx node) or an ``nn.Flatten`` module (a
``call_module`` node); both nodes are named ``flatten``, but placement rules, fusion patterns and exporters may
treat the two kinds differently, so tensor and quantizer names in a golden file belong to one of them: keep the
``flatten_module`` setting the file was written with. Which quantizers exist (``conv_fq`` for the ReLU-merged conv
output, ``flatten_fq`` for the Linear's input, ``fc_fq`` for the output, ...) is the backend's placement; list
them with ``mq.quantizers(qmodel)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mq_core.errors import UnknownNameError
from mq_core.export import ExportResult
from mq_core.pipeline.calibrate import calibrate
from mq_core.pipeline.export import export_many
from mq_core.pipeline.prepare import prepare
from mq_core.quant.switches import quantizers

__all__ = ["TinyNet", "golden_export", "set_qparams", "tiny_inputs"]


def _output_size(size: int, kernel: int, padding: int) -> int:
    return size + 2 * padding - kernel + 1


class TinyNet(nn.Module):
    """``Conv2d(in_channels -> channels, kernel, padding) -> ReLU -> flatten -> Linear(... -> classes)``.

    The input is ``[batch, in_channels, size, size]`` (see :func:`tiny_inputs`); the Linear takes the flattened
    conv output, ``channels * (size + 2 * padding - kernel + 1) ** 2`` features. Submodules are ``conv``,
    ``relu``, ``flatten`` (only with ``flatten_module=True``) and ``fc``.

    Args:
        flatten_module: flatten with an ``nn.Flatten`` module instead of ``torch.flatten(x, 1)``: a different
            kind of fx node, which a backend may quantize and name differently (see the module docstring); keep
            the one the golden file was written for.
        conv_weight, conv_bias, fc_weight, fc_bias: values set by hand instead of torch's random initialisation
            (anything ``torch.as_tensor`` accepts, with as many elements as the parameter, in its order; flat or
            already shaped). Parameters left as ``None`` keep the initialisation, so seed torch before
            constructing (the conv is initialised first, then the Linear).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 2,
        kernel: int = 1,
        padding: int = 0,
        size: int = 2,
        classes: int = 2,
        *,
        flatten_module: bool = False,
        conv_weight: Any = None,
        conv_bias: Any = None,
        fc_weight: Any = None,
        fc_bias: Any = None,
    ) -> None:
        super().__init__()
        out = _output_size(size, kernel, padding)
        if out < 1:
            raise ValueError(f"TinyNet: a {kernel}x{kernel} conv with padding {padding} on {size}x{size} inputs "
                             "leaves nothing to flatten; use a larger size or padding.")
        self.conv = nn.Conv2d(in_channels, channels, kernel, padding=padding)
        self.relu = nn.ReLU()
        if flatten_module:
            self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * out * out, classes)
        self.flatten_module = flatten_module
        hand_set = {"conv.weight": conv_weight, "conv.bias": conv_bias, "fc.weight": fc_weight, "fc.bias": fc_bias}
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in hand_set.items():
                if value is not None:
                    param = parameters[name]
                    tensor = torch.as_tensor(value, dtype=param.dtype)
                    if tensor.numel() != param.numel():
                        raise ValueError(f"TinyNet: {name} has shape {tuple(param.shape)} ({param.numel()} values); "
                                         f"got {tensor.numel()} values.")
                    param.copy_(tensor.reshape(param.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        return self.fc(self.flatten(y) if self.flatten_module else torch.flatten(y, 1))


def tiny_inputs(
    batch: int = 2,
    in_channels: int = 1,
    size: int = 2,
    *,
    seed: int = 0,
    span: tuple[float, float] | None = None,
) -> torch.Tensor:
    """A ``[batch, in_channels, size, size]`` float32 input for :class:`TinyNet` built with the same parameters.

    By default standard-normal values from a generator seeded with ``seed`` (the same tensor on every call, and
    independent of torch's global seed). With ``span=(low, high)``, evenly spaced values from ``low`` to ``high``
    instead, in memory order, for inputs whose every value is worked out by hand.
    """
    shape = (batch, in_channels, size, size)
    if span is not None:
        return torch.linspace(span[0], span[1], batch * in_channels * size * size).reshape(shape)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def set_qparams(qmodel: nn.Module, qparams: Mapping[str, tuple[Any, Any]]) -> None:
    """Set the scale and zero point of quantizers by name: ``{name: (scale, zero_point)}``.

    Names are those of :func:`mq_core.pipeline.calibrate.quantizers` (``mq.quantizers``), e.g. ``"x_fq"`` or
    ``"conv.weight_fake_quant"``. A scale is a float, or a list with one value per channel for a per-channel
    quantizer; a zero point is an int, or a list of the same length (a single int is used for every channel).
    Quantizers not named keep their qparams. Call it after calibration: calibration would overwrite them.

    Raises:
        UnknownNameError: naming every name that is not a quantizer of ``qmodel`` (nothing is set then).
        ValueError: a zero point list whose length differs from the scale's.
    """
    found = quantizers(qmodel)
    unknown = [name for name in qparams if name not in found]
    if unknown:
        raise UnknownNameError(f"set_qparams: no quantizer named {', '.join(map(repr, unknown))} in the model. "
                               f"Its quantizers are: {', '.join(found) or 'none'}.")
    values = {}
    for name, (scale, zero_point) in qparams.items():
        scale_t = torch.as_tensor(scale, dtype=torch.float32)
        zero_t = torch.as_tensor(zero_point, dtype=torch.int32)
        if zero_t.ndim == 0 and scale_t.ndim > 0:
            zero_t = zero_t.expand(scale_t.shape).clone()
        if zero_t.shape != scale_t.shape:
            raise ValueError(f"set_qparams: {name}: {scale_t.numel()} scale(s) but {zero_t.numel()} zero points.")
        values[name] = (scale_t, zero_t)
    for name, (scale_t, zero_t) in values.items():
        found[name].set_qparams(scale_t, zero_t)


def golden_export(model: nn.Module, backend: Any, inputs: torch.Tensor, qparams: Mapping[str, tuple[Any, Any]],
                  out_dir: Any, *, qconfig: Any = None, exporters: list[str] | None = None,
                  every_quantizer: bool = False) -> dict[str, ExportResult]:
    """Prepare ``model`` for ``backend`` (with ``qconfig``), calibrate it on ``inputs``, set ``qparams`` by hand
    and export with each of ``exporters`` (default: all of the backend's) into ``out_dir/<exporter>/``.

    With ``every_quantizer``, ``qparams`` must name every quantizer of the prepared model, so that no number of the
    golden file depends on calibration.

    Raises:
        ValueError: ``every_quantizer`` is set and some quantizers are not named (listed in the message).
    """
    qmodel = prepare(model, backend, inputs, qconfig=qconfig)
    calibrate(qmodel, [inputs], progress=False)
    missing = [name for name in quantizers(qmodel) if name not in qparams]
    if every_quantizer and missing:
        raise ValueError(f"golden_export: no hand-set qparams for {', '.join(missing)}; name every quantizer of "
                         f"the prepared model (or pass every_quantizer=False).")
    set_qparams(qmodel, qparams)
    return export_many(qmodel, inputs, out_dir, exporters)
