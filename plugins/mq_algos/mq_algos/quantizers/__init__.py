"""Learnable QAT fake quantizers and their initialising observers.

``FAKE_QUANTIZERS`` and ``OBSERVERS`` map registry names to classes; ``mq_algos.plugin`` registers them.
"""

from typing import Any

FAKE_QUANTIZERS: dict[str, type[Any]] = {}
OBSERVERS: dict[str, type[Any]] = {}
