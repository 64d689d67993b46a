"""mq-algos: learnable QAT quantizers and PTQ reconstruction methods for mq."""

__version__ = "0.1.0"
