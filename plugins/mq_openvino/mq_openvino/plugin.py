"""Entry point of mq-openvino (group ``mq``): registers the OpenVINO backend, exporters and runtime."""

from typing import Any

from mq_core import hookimpl
from mq_openvino.backend import OPENVINO


@hookimpl
def register_backends(register: Any) -> None:
    register(OPENVINO)
