"""Range estimators. Each registers under a name through ``register_observers``."""

from mq_core.quant.observers.base import Observer, channels_first

__all__ = ["Observer", "channels_first"]
