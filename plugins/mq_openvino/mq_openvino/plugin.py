"""Entry point of mq-openvino (group ``mq``): registers the OpenVINO backend, exporters and runtime."""

from typing import Any

from mq_core import hookimpl
from mq_openvino.backend import OPENVINO
from mq_openvino.exporters import OpenVINOExporter, OpenVINOQDQExporter
from mq_openvino.runtime import OpenVINOInt8Runtime, OpenVINORuntime


@hookimpl
def register_backends(register: Any) -> None:
    register(OPENVINO)


@hookimpl
def register_exporters(register: Any) -> None:
    register(OpenVINOExporter())
    register(OpenVINOQDQExporter())


@hookimpl
def register_runtimes(register: Any) -> None:
    register(OpenVINORuntime())
    register(OpenVINOInt8Runtime())
