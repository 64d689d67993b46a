"""Entry point of mq-tvm (group ``mq``): registers the TVM backend, its exporters and the TVM runtime."""

from mq_core.plugin_api import Backend, Exporter, Register, Runtime, hookimpl
from mq_tvm.backend import TVM
from mq_tvm.exporters import TVMExporter, TVMQOperatorExporter
from mq_tvm.runtime import TVMRuntime


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(TVM)


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(TVMExporter())
    register(TVMQOperatorExporter())


@hookimpl
def register_runtimes(register: Register[Runtime]) -> None:
    register(TVMRuntime())
