"""Entry point of mq-openvino (group ``mq``): registers the OpenVINO backend, exporters and runtime."""

from mq_core.plugin_api import Backend, Exporter, Register, Runtime, hookimpl
from mq_openvino.backend import OPENVINO
from mq_openvino.exporters import OpenVINOExporter, OpenVINOQDQExporter
from mq_openvino.runtime import OpenVINOInt8Runtime, OpenVINORuntime


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(OPENVINO)


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(OpenVINOExporter())
    register(OpenVINOQDQExporter())


@hookimpl
def register_runtimes(register: Register[Runtime]) -> None:
    register(OpenVINORuntime())
    register(OpenVINOInt8Runtime())
