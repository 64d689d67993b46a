"""Entry point of mq-snpe (group ``mq``): registers the SNPE/QNN backend and its exporters."""

from typing import Any

from mq_core import hookimpl
from mq_snpe.backend import SNPE
from mq_snpe.exporter import QNNExporter, SNPEExporter


@hookimpl
def register_backends(register: Any) -> None:
    register(SNPE)


@hookimpl
def register_exporters(register: Any) -> None:
    register(SNPEExporter())
    register(QNNExporter())
