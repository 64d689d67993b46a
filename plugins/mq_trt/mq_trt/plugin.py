"""Entry point of mq-trt (group ``mq``): registers the TensorRT backend and its exporters."""

from typing import Any

from mq_core import hookimpl
from mq_trt.backend import TENSORRT


@hookimpl
def register_backends(register: Any) -> None:
    register(TENSORRT)
