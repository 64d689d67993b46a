"""PTQ methods: reconstruction (AdaRound, BRECQ, QDrop), cross-layer equalization, bias correction and SmoothQuant.

``METHODS`` holds one instance per method; ``mq_algos.plugin`` registers them. The config classes are public so
that a config can be built and passed to ``mq.ptq(qmodel, method, data, config)``.
"""

from mq_algos.ptq.adaround import AdaRound, AdaRoundConfig
from mq_algos.ptq.bias_correction import BiasCorrection, BiasCorrectionConfig
from mq_algos.ptq.brecq import BRECQ, BRECQConfig
from mq_algos.ptq.cle import CLE, CLEConfig
from mq_algos.ptq.qdrop import QDrop, QDropConfig
from mq_algos.ptq.smoothquant import SmoothQuant, SmoothQuantConfig
from mq_core.plugin_api import PTQMethod

METHODS: list[PTQMethod] = [AdaRound(), BRECQ(), QDrop(), CLE(), BiasCorrection(), SmoothQuant()]

__all__ = ["BRECQ", "CLE", "METHODS", "AdaRound", "AdaRoundConfig", "BRECQConfig", "BiasCorrection",
           "BiasCorrectionConfig", "CLEConfig", "QDrop", "QDropConfig", "SmoothQuant", "SmoothQuantConfig"]
