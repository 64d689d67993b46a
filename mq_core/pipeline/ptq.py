"""Post-training quantization methods: the plugin interface and ``mq.ptq``.

A method (AdaRound, BRECQ, QDrop in mq-algos) registers through ``register_ptq_methods``. It runs after
calibration on a calibrated prepared model and calibration data, changes weights/qparams in place, and leaves
the model with quantization enabled, so it exports like any other.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from mq_core.errors import CalibrationError, ConfigError
from mq_core.pipeline.calibrate import iter_batches, model_inputs
from mq_core.pipeline.prepare import prepare_info
from mq_core.plugins.lookup import get_ptq_method
from mq_core.quant.switches import quantizers


class PTQMethod:
    """Base class: subclasses set ``name``, ``description`` and ``Config`` (a dataclass whose field defaults are
    the documented defaults) and implement ``apply``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Config:
        """No options."""

    def make_config(self, config: Any = None, **overrides: Any) -> Any:
        if config is not None and overrides:
            raise ConfigError("pass either a config object or keyword overrides, not both.")
        if config is not None:
            if type(config) is not self.Config:  # a subclass (QDrop's config for BRECQ) would be half ignored
                raise ConfigError(f"{self.name} expects a {type(self).__name__}.Config, got {type(config).__name__}.")
            return config
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"PTQ method {self.name!r} has no option(s) {unknown}; its options are {sorted(known)}.")
        hints = typing.get_type_hints(self.Config)
        return self.Config(**{key: _coerce(self.name, key, value, hints.get(key)) for key, value in overrides.items()})

    def apply(self, qmodel: nn.Module, data: list[Any], config: Any, progress: bool) -> None:
        raise NotImplementedError


def _coerce(method: str, key: str, value: Any, hint: Any) -> Any:
    """An option value as its field's type, or a ConfigError: options come from the command line and TOML files as
    JSON-ish values, and a string where a number belongs must fail here, not deep inside the method."""
    def wrong(kind: str) -> ConfigError:
        return ConfigError(f"PTQ method {method!r}: option {key} must be {kind}, got {value!r}.")

    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise wrong("an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if typing.get_origin(hint) is tuple:
        items = (value,) if isinstance(value, str) else value  # blocks=layer1 means one block
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise wrong("a list of names")
        return tuple(items)
    return value


def ptq(
    qmodel: nn.Module,
    method: str | PTQMethod,
    data: Any,
    config: Any = None,
    *,
    num_batches: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Apply a registered PTQ method to a calibrated prepared model (in place; also returned).

    Args:
        method: a name (``"adaround"``, ``"brecq"``, ``"qdrop"``) or a PTQMethod.
        data: calibration data, by ``mq.calibrate``'s rule (``mq_core.pipeline.calibrate.iter_batches``): a tensor
            ``[N, ...]`` of samples, a Dataset, a DataLoader or an iterable of batches (mq-algos'
            methods use every sample, so how a tensor is split into batches does not matter to them).
        config: the method's ``Config``; or pass its fields as keyword ``overrides``.
        num_batches: use at most this many batches.
    """
    prepare_info(qmodel)
    chosen = get_ptq_method(method)
    cfg = chosen.make_config(config, **overrides)
    missing = [n for n, fq in quantizers(qmodel).items() if not fq.is_calibrated]
    if missing:
        raise CalibrationError(
            f"{chosen.name} runs after calibration, but {len(missing)} quantizer(s) are uncalibrated "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Run mq.calibrate(qmodel, data) first."
        )
    batches = list(iter_batches(data, num_batches))
    if not batches:
        raise CalibrationError(f"{chosen.name} needs calibration data; the data given is empty.")
    for index, batch in enumerate(batches, 1):
        model_inputs(qmodel, batch, index=index)  # wrong shapes fail here, not deep inside the method
    chosen.apply(qmodel, batches, cfg, progress)
    return qmodel
