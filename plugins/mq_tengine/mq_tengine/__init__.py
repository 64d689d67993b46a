"""mq-tengine: the OPEN AI LAB Tengine target for mq."""

__version__ = "0.1.0"
