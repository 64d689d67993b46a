"""Entry point of mq-algos (group ``mq``): learnable quantizers, their observers, presets and PTQ methods."""

from typing import Any

from mq_algos.presets import PRESETS
from mq_algos.ptq import METHODS
from mq_algos.quantizers import FAKE_QUANTIZERS, OBSERVERS
from mq_core import hookimpl


@hookimpl
def register_fake_quantizers(register: Any) -> None:
    for name, cls in FAKE_QUANTIZERS.items():
        register(cls, name=name)


@hookimpl
def register_observers(register: Any) -> None:
    for name, cls in OBSERVERS.items():
        register(cls, name=name)


@hookimpl
def register_qconfigs(register: Any) -> None:
    for preset in PRESETS:
        register(preset)


@hookimpl
def register_ptq_methods(register: Any) -> None:
    for method in METHODS:
        register(method)
