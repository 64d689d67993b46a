"""mq: quantize a PyTorch model for a real target, export what the target consumes, verify it on a runtime.

    import mq_core as mq
    backend = mq.get_backend("tensorrt")
    qmodel = mq.prepare(model, backend, example_inputs=(x,))
    mq.calibrate(qmodel, loader)
    result = mq.export(qmodel, (x,), "deploy/")
    report = mq.verify(result, (x,))
"""

from mq_core._version import __version__
from mq_core.backend import Backend
from mq_core.checkpoint import load_checkpoint, restore, save_checkpoint
from mq_core.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    MQError,
    PluginConflictError,
    SchemeError,
    TraceError,
    UnknownNameError,
    VerificationError,
)
from mq_core.export import Artifact, Exporter, ExportResult
from mq_core.graph.policy import PlacementPolicy, input_placement, output_placement
from mq_core.hookspecs import hookimpl
from mq_core.nn import FrozenBatchNorm2d, freeze_bn, unfreeze_bn
from mq_core.pipeline.calibrate import calibrate
from mq_core.pipeline.export import export
from mq_core.pipeline.prepare import PrepareInfo, prepare, prepare_info
from mq_core.pipeline.ptq import PTQMethod, ptq
from mq_core.pipeline.resolve import resolve_qconfig
from mq_core.pipeline.verify import VerificationReport, verify
from mq_core.pipeline.verify_layers import LayerReport, TensorCheck, verify_layers
from mq_core.plugins.lookup import (
    get_backend,
    get_entry,
    get_exporter,
    get_fake_quantizer,
    get_observer,
    get_ptq_method,
    get_qconfig,
    get_runtime,
    list_backends,
    list_exporters,
    list_fake_quantizers,
    list_observers,
    list_ptq_methods,
    list_qconfigs,
    list_runtimes,
)
from mq_core.quant.fake_quant import FakeQuantizer, FixedFakeQuantizer
from mq_core.quant.observers.base import Observer
from mq_core.quant.qconfig import QConfig, QConfigPreset, QuantizerSpec
from mq_core.quant.scheme import QuantScheme
from mq_core.quant.switches import disable_all, enable_calibration, enable_quantization, quantizers
from mq_core.runtimes.base import Runtime
from mq_core.summary import summary

__all__ = [
    "Artifact",
    "Backend",
    "CalibrationError",
    "ConfigError",
    "ExportError",
    "ExportResult",
    "Exporter",
    "FakeQuantizer",
    "FixedFakeQuantizer",
    "FrozenBatchNorm2d",
    "LayerReport",
    "MQError",
    "Observer",
    "PTQMethod",
    "PlacementPolicy",
    "PluginConflictError",
    "PrepareInfo",
    "QConfig",
    "QConfigPreset",
    "QuantScheme",
    "QuantizerSpec",
    "Runtime",
    "SchemeError",
    "TensorCheck",
    "TraceError",
    "UnknownNameError",
    "VerificationError",
    "VerificationReport",
    "__version__",
    "calibrate",
    "disable_all",
    "enable_calibration",
    "enable_quantization",
    "export",
    "freeze_bn",
    "get_backend",
    "get_entry",
    "get_exporter",
    "get_fake_quantizer",
    "get_observer",
    "get_ptq_method",
    "get_qconfig",
    "get_runtime",
    "hookimpl",
    "input_placement",
    "list_backends",
    "list_exporters",
    "list_fake_quantizers",
    "list_observers",
    "list_ptq_methods",
    "list_qconfigs",
    "list_runtimes",
    "load_checkpoint",
    "output_placement",
    "prepare",
    "prepare_info",
    "ptq",
    "quantizers",
    "resolve_qconfig",
    "restore",
    "save_checkpoint",
    "summary",
    "unfreeze_bn",
    "verify",
    "verify_layers",
]
