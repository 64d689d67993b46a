"""Range estimators. Each registers under a name through ``register_observers``."""

from mq_core.quant.observers.base import Observer, channels_first
from mq_core.quant.observers.clip_std import ClipStdObserver
from mq_core.quant.observers.kl import KLObserver
from mq_core.quant.observers.minmax import EMAMinMaxObserver, MinMaxObserver
from mq_core.quant.observers.mse import MSEObserver
from mq_core.quant.observers.percentile import PercentileObserver

__all__ = [
    "ClipStdObserver",
    "EMAMinMaxObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "channels_first",
]
