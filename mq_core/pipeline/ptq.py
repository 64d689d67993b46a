"""Post-training quantization methods: the plugin interface and ``mq.ptq``.

A method (AdaRound, BRECQ, QDrop, bias correction, cross-layer equalization in mq-algos) registers through
``register_ptq_methods``. It works on a prepared model and calibration data, changes weights/qparams in place, and
leaves the model calibrated with quantization enabled, so it exports like any other.

Methods compose: ``mq.ptq(qmodel, "cle,bias_correction,adaround", data)`` runs them in the order given. A method
of the ``"float"`` stage (CLE) rewrites the float weights, which every range measured before it depends on, so it
must come before the ``"calibrated"`` ones (which start from calibrated qparams), and ``mq.ptq`` calibrates the
model again, on the data it was given, after the last of them. That is also why such a method accepts a model
that was never calibrated.

Data is streamed: a method gets a ``CalibrationData``, which reads the data anew on every ``iter()`` (one batch at a
time, moved to the model's device) and holds none of it, so a method reads it once per pass and keeps only the
statistics (or, for reconstruction, the one unit's cache) it needs. Under ``torch.distributed`` each rank passes
its shard (a ``DataLoader`` with a ``DistributedSampler``) and ``data.group`` names the ranks whose statistics a
method merges (docs/algorithms.md, "Streaming and memory").
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.distributed as dist
from torch import nn

from mq_core.errors import CalibrationError, ConfigError
from mq_core.pipeline.calibrate import (
    CalibrationData,
    RankAgreement,
    calibrate,
    model_device,
    sync_group,
)
from mq_core.pipeline.prepare import prepare_info
from mq_core.plugins.lookup import get_ptq_method
from mq_core.quant.switches import quantizers


class PTQMethod:
    """Base class: subclasses set ``name``, ``description`` and ``Config`` (a dataclass whose field defaults are
    the documented defaults) and implement ``apply``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: ``"calibrated"``: runs after calibration, on calibrated qparams (AdaRound, bias correction).
    #: ``"float"``: changes the float function's parametrisation (CLE), so it runs before calibration, and
    #: ``mq.ptq`` calibrates again after it; in a composition it comes before every "calibrated" method.
    stage: ClassVar[str] = "calibrated"

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

    def apply(self, qmodel: nn.Module, data: CalibrationData, config: Any, progress: bool) -> None:
        """Change ``qmodel`` in place. ``data`` is re-iterable: iterate it once per pass over the calibration data
        (each batch is already on the model's device); keep statistics, not batches. Statistics meant to cover the
        data set are merged over ``data.group`` when it is not None (every rank holds a shard)."""
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


STAGES = ("float", "calibrated")


def ptq_plan(method: str | PTQMethod | Sequence[str | PTQMethod], config: Any = None,
             **overrides: Any) -> list[tuple[PTQMethod, Any]]:
    """The methods of ``method`` (a name, ``"a,b,c"``, a PTQMethod or a list of them) in order, each with its
    config; every name, option and ordering error is a ``ConfigError`` here, before any work.

    Options go to the methods that have them: ``iterations=500`` to every method of the list with an option of
    that name, ``adaround.iterations=500`` to adaround only. An option no method of the list has is an error.
    ``config`` (a method's ``Config`` object) needs a single method.
    """
    items: list[str | PTQMethod]
    if isinstance(method, str):
        items = [part.strip() for part in method.split(",")]
        if any(not part for part in items):
            raise ConfigError(f"PTQ method list {method!r} has an empty name; separate names by single commas, "
                              "e.g. 'cle,bias_correction,adaround'.")
    elif isinstance(method, PTQMethod):
        items = [method]
    elif isinstance(method, Sequence) and method and all(isinstance(m, str | PTQMethod) for m in method):
        items = list(method)
    else:
        raise ConfigError(f"method must be a PTQ method name, a comma-separated list of names or a PTQMethod, got "
                          f"{method!r}.")
    chosen: list[PTQMethod] = [get_ptq_method(item) for item in items]
    names = [m.name for m in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"PTQ method list {','.join(names)} names {', '.join(repeated)} twice; name each method "
                          "once.")
    for m in chosen:
        if m.stage not in STAGES:
            raise ConfigError(f"PTQ method {m.name!r} declares stage {m.stage!r}; a stage is one of {STAGES}.")
    stages = [STAGES.index(m.stage) for m in chosen]
    if stages != sorted(stages):
        late = next(m for i, m in enumerate(chosen) if m.stage == "float" and i and stages[i - 1] > stages[i])
        raise ConfigError(
            f"PTQ method list {','.join(names)}: {late.name} rewrites the float weights, so it must come before the "
            f"methods that work on calibrated qparams ({', '.join(m.name for m in chosen if m.stage != 'float')}); "
            f"put it first, e.g. {','.join(sorted(names, key=lambda n: stages[names.index(n)]))}."
        )
    if config is not None:
        if len(chosen) != 1:
            raise ConfigError(f"a config object configures one method, but {','.join(names)} names {len(chosen)}; "
                              "pass options as keywords (name.option=value for one method) instead.")
        return [(chosen[0], chosen[0].make_config(config, **overrides))]
    per_method: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in overrides.items():
        target, dot, option = key.rpartition(".")
        if dot:
            if target not in per_method:
                raise ConfigError(f"option {key!r} is for PTQ method {target!r}, which is not among {','.join(names)}.")
            per_method[target][option] = value
            continue
        owners = [m.name for m in chosen if option in {f.name for f in dataclasses.fields(m.Config)}]
        if len(chosen) == 1:
            owners = [chosen[0].name]  # its make_config names the unknown option and lists the known ones
        if not owners:
            known = "; ".join(f"{m.name}: {sorted(f.name for f in dataclasses.fields(m.Config))}" for m in chosen)
            raise ConfigError(f"no PTQ method of {','.join(names)} has an option {option!r}; their options are "
                              f"{known}.")
        for owner in owners:
            per_method[owner][option] = value
    return [(m, m.make_config(**per_method[m.name])) for m in chosen]


def ptq(
    qmodel: nn.Module,
    method: str | PTQMethod | Sequence[str | PTQMethod],
    data: Any,
    config: Any = None,
    *,
    num_batches: int | None = None,
    progress: bool = True,
    sync: bool = True,
    process_group: dist.ProcessGroup | None = None,
    **overrides: Any,
) -> nn.Module:
    """Apply registered PTQ methods to a prepared model, in order (in place; also returned).

    Args:
        method: a name (``"adaround"``, ``"brecq"``, ``"qdrop"``, ``"cle"``, ``"bias_correction"``), a comma-separated
            list of names run in that order (``"cle,bias_correction,adaround"``), a PTQMethod or a list of them.
            Methods of the "float" stage (``cle``) come first; the model is calibrated again on ``data`` after them.
        data: calibration data, by ``mq.calibrate``'s rule (``mq_core.pipeline.calibrate.iter_batches``): a tensor
            ``[N, ...]`` of samples, a Dataset, a DataLoader or a re-iterable of batches (a list; not a generator:
            methods read the data once per pass, several passes). It is streamed, never held (mq-algos' methods
            use every sample, so how a tensor is split into batches does not matter to them).
        config: the method's ``Config`` (a single method only); or pass options as keyword ``overrides``
            (``iterations=500``, or ``adaround.iterations=500`` for one method of a list: ``ptq_plan``).
        num_batches: use at most this many batches (per pass).
        sync: under an initialised ``torch.distributed`` group of more than one rank, each rank passes its own shard
            and the methods merge their statistics across the ranks (as ``mq.calibrate`` does), so every rank ends
            with the same model, that of one process on the union of the shards (docs/algorithms.md). Every rank
            must call ``ptq``. ``False``: each rank on its own.
        process_group: the group to merge over (default: the world).
    """
    prepare_info(qmodel)
    plan = ptq_plan(method, config, **overrides)
    names = ",".join(m.name for m, _ in plan)
    missing = [n for n, fq in quantizers(qmodel).items() if not fq.is_calibrated]
    if missing and plan[0][0].stage != "float":
        raise CalibrationError(
            f"{names} runs after calibration, but {len(missing)} quantizer(s) are uncalibrated "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Run mq.calibrate(qmodel, data) first."
        )
    group = sync_group(sync, process_group)
    agreement = RankAgreement(group)  # a rank whose data is bad makes the others fail too, instead of waiting
    try:
        # every batch is checked as it is read: a wrong shape fails with its number, not deep inside the method
        batches = CalibrationData(data, num_batches=num_batches, device=model_device(qmodel), group=group,
                                  check=qmodel)
        if next(iter(batches), None) is None:
            raise CalibrationError(f"{names} needs calibration data; the data given is empty.")
    except BaseException:
        agreement.fail()
        raise
    agreement.confirm()
    for position, (chosen, cfg) in enumerate(plan):
        chosen.apply(qmodel, batches, cfg, progress)
        following = plan[position + 1][0] if position + 1 < len(plan) else None
        if chosen.stage == "float" and (following is None or following.stage != "float"):
            # the float weights changed: every range is measured anew (merged over the same ranks)
            calibrate(qmodel, batches, progress=progress, sync=group is not None, process_group=group)
    return qmodel
