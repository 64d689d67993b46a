"""Entry point of mq-snpe (group ``mq``): registers the SNPE/QNN backend and its exporters."""

from mq_core.plugin_api import Backend, Exporter, Register, hookimpl
from mq_snpe.backend import SNPE
from mq_snpe.exporter import QNNExporter, SNPEExporter


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(SNPE)


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(SNPEExporter())
    register(QNNExporter())
