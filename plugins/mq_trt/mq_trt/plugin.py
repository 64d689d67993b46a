"""Entry point of mq-trt (group ``mq``): registers the TensorRT backend and its exporters."""

from typing import Any

from mq_core import hookimpl
from mq_trt.backend import TENSORRT
from mq_trt.explicit import TensorRTExporter
from mq_trt.legacy import TensorRTLegacyExporter


@hookimpl
def register_backends(register: Any) -> None:
    register(TENSORRT)


@hookimpl
def register_exporters(register: Any) -> None:
    register(TensorRTExporter())
    register(TensorRTLegacyExporter())
