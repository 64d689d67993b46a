"""Entry point of mq-tvm (group ``mq``): registers the TVM backend, its exporters and the TVM runtime."""

from typing import Any

from mq_core import hookimpl
from mq_tvm.backend import TVM


@hookimpl
def register_backends(register: Any) -> None:
    register(TVM)
