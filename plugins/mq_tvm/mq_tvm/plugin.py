"""Entry point of mq-tvm (group ``mq``): registers the TVM backend, its exporters and the TVM runtime."""

from typing import Any

from mq_core import hookimpl
from mq_tvm.backend import TVM
from mq_tvm.exporters import TVMExporter, TVMQOperatorExporter
from mq_tvm.runtime import TVMRuntime


@hookimpl
def register_backends(register: Any) -> None:
    register(TVM)


@hookimpl
def register_exporters(register: Any) -> None:
    register(TVMExporter())
    register(TVMQOperatorExporter())


@hookimpl
def register_runtimes(register: Any) -> None:
    register(TVMRuntime())
