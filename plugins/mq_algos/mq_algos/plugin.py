"""Entry point of mq-algos (group ``mq``): learnable quantizers, their observers, presets and PTQ methods."""

from mq_algos.presets import PRESETS
from mq_algos.ptq import METHODS
from mq_algos.quantizers import FAKE_QUANTIZERS, OBSERVERS
from mq_core.plugin_api import FakeQuantizer, Observer, PTQMethod, QConfigPreset, Register, hookimpl


@hookimpl
def register_fake_quantizers(register: Register[type[FakeQuantizer]]) -> None:
    for name, cls in FAKE_QUANTIZERS.items():
        register(cls, name=name)


@hookimpl
def register_observers(register: Register[type[Observer]]) -> None:
    for name, cls in OBSERVERS.items():
        register(cls, name=name)


@hookimpl
def register_qconfigs(register: Register[QConfigPreset]) -> None:
    for preset in PRESETS:
        register(preset)


@hookimpl
def register_ptq_methods(register: Register[PTQMethod]) -> None:
    for method in METHODS:
        register(method)
