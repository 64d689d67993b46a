"""PTQ reconstruction methods (AdaRound, BRECQ, QDrop).

``METHODS`` holds one instance per method; ``mq_algos.plugin`` registers them.
"""

from typing import Any

METHODS: list[Any] = []
