"""Entry point of mq-snpe (group ``mq``): registers the SNPE/QNN backend and its exporters."""

from typing import Any

from mq_core import hookimpl
from mq_snpe.backend import SNPE


@hookimpl
def register_backends(register: Any) -> None:
    register(SNPE)
