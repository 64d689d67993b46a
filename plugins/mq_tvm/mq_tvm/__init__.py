"""mq-tvm: the Apache TVM target for mq."""

__version__ = "0.1.0"
