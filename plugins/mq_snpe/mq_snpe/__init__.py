"""mq-snpe: the Qualcomm SNPE / QNN target for mq."""

__version__ = "0.1.0"
