"""Learnable QAT fake quantizers and their initialising observers.

``FAKE_QUANTIZERS`` and ``OBSERVERS`` map registry names to classes; ``mq_algos.plugin`` registers them. Each
quantizer lives in its own module with the paper's equations in its docstring.
"""

from typing import Any

from mq_algos.quantizers.apot import APoTFakeQuantizer
from mq_algos.quantizers.dorefa import DoReFaFakeQuantizer
from mq_algos.quantizers.dsq import DSQFakeQuantizer
from mq_algos.quantizers.lsq import LSQFakeQuantizer, LSQObserver
from mq_algos.quantizers.lsq_plus import LSQPlusFakeQuantizer, LSQPlusObserver
from mq_algos.quantizers.pact import PACTFakeQuantizer

FAKE_QUANTIZERS: dict[str, type[Any]] = {
    "lsq": LSQFakeQuantizer,
    "lsq_plus": LSQPlusFakeQuantizer,
    "pact": PACTFakeQuantizer,
    "dorefa": DoReFaFakeQuantizer,
    "dsq": DSQFakeQuantizer,
    "apot": APoTFakeQuantizer,
}
OBSERVERS: dict[str, type[Any]] = {
    "lsq": LSQObserver,
    "lsq_plus": LSQPlusObserver,
}
