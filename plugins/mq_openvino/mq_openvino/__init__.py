"""mq-openvino: the Intel OpenVINO target for mq."""

__version__ = "0.1.0"
