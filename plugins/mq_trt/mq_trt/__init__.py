"""mq-trt: the NVIDIA TensorRT target for mq."""

__version__ = "0.1.0"
