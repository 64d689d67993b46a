"""mq-trt: the NVIDIA TensorRT target for mq (explicit Q/DQ ONNX, legacy ranges files, a Q/DQ placement lint)."""

from mq_trt.formats import read_calibration_cache, read_dynamic_range
from mq_trt.lint import Violation, lint_qdq

__version__ = "0.1.0"

__all__ = ["Violation", "__version__", "lint_qdq", "read_calibration_cache", "read_dynamic_range"]
