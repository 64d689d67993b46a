"""Entry point of mq-trt (group ``mq``): registers the TensorRT backend and its exporters."""

from mq_core.plugin_api import Backend, Exporter, Register, hookimpl
from mq_trt.backend import TENSORRT
from mq_trt.explicit import TensorRTExporter
from mq_trt.legacy import TensorRTLegacyExporter


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(TENSORRT)


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(TensorRTExporter())
    register(TensorRTLegacyExporter())
