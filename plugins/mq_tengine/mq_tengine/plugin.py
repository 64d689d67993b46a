"""Entry point of mq-tengine (group ``mq``): registers the Tengine backend and its exporter."""

from mq_core.plugin_api import Backend, Exporter, Register, hookimpl
from mq_tengine.backend import TENGINE
from mq_tengine.exporter import TengineExporter


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(TENGINE)


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(TengineExporter())
