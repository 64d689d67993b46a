"""PTQ reconstruction methods (AdaRound, BRECQ, QDrop).

``METHODS`` holds one instance per method; ``mq_algos.plugin`` registers them. The config classes are public so
that a config can be built and passed to ``mq.ptq(qmodel, method, data, config)``.
"""

from mq_algos.ptq.adaround import AdaRound, AdaRoundConfig
from mq_algos.ptq.brecq import BRECQ, BRECQConfig
from mq_algos.ptq.qdrop import QDrop, QDropConfig
from mq_core.plugin_api import PTQMethod

METHODS: list[PTQMethod] = [AdaRound(), BRECQ(), QDrop()]

__all__ = ["BRECQ", "METHODS", "AdaRound", "AdaRoundConfig", "BRECQConfig", "QDrop", "QDropConfig"]
