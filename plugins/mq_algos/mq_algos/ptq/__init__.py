"""PTQ reconstruction methods (AdaRound, BRECQ, QDrop).

``METHODS`` holds one instance per method; ``mq_algos.plugin`` registers them.
"""

from mq_algos.ptq.adaround import AdaRound
from mq_algos.ptq.brecq import BRECQ
from mq_algos.ptq.qdrop import QDrop
from mq_core.ptq import PTQMethod

METHODS: list[PTQMethod] = [AdaRound(), BRECQ(), QDrop()]
