"""Entry point of mq-tengine (group ``mq``): registers the Tengine backend and its exporter."""

from typing import Any

from mq_core import hookimpl
from mq_tengine.backend import TENGINE
from mq_tengine.exporter import TengineExporter


@hookimpl
def register_backends(register: Any) -> None:
    register(TENGINE)


@hookimpl
def register_exporters(register: Any) -> None:
    register(TengineExporter())
