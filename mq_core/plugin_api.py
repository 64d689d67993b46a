"""The public API for plugin authors: everything a backend, exporter, runtime, observer, quantizer or PTQ method
needs, in one module.

Import from here (or from the top-level ``mq_core`` names), never from mq's internal modules: those move between
releases, these names do not. Stability: every name in ``__all__`` of this module and of ``mq_core`` is kept
compatible within a minor series; a name is removed or changed incompatibly only after one minor release in which
using it raises a ``DeprecationWarning``. ``mq_core.testing`` (the zoo, the golden helpers, the conformance kit
and its pytest fixtures) is public too. Everything else under ``mq_core`` is internal.
"""

from __future__ import annotations

from mq_core.backend import Backend
from mq_core.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    MQError,
    SchemeError,
    VerificationError,
)
from mq_core.export.exporter import Artifact, ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.onnx_graph import Graph, QDQPair, make_node
from mq_core.export.qdq import QDQExporter
from mq_core.export.quant_table import QuantTable, TensorQuant, apply_table, strip_qdq, weights_as_device_quantizes
from mq_core.export.ranges import (
    PASSTHROUGH_OPS,
    graph_order,
    in_graph_order,
    propagate_through_passthrough,
    rebuild_qdq,
    uncovered_tensors,
    unsigned_view,
)
from mq_core.graph.fusion import FusionPattern, ModulePredicate
from mq_core.graph.policy import PlacementPolicy, input_placement, output_placement
from mq_core.hookspecs import hookimpl
from mq_core.nn.bn_fold import bn_scale_factor, channel_view
from mq_core.nn.qat import QATBnModule, QATModule
from mq_core.pipeline.calibrate import disable_all, num_inputs, quantizers, run_batch
from mq_core.pipeline.prepare import prepare_info
from mq_core.pipeline.ptq import PTQMethod
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import along_axis, fake_quantize, quantize
from mq_core.quant.observers.base import Observer, channels_first
from mq_core.quant.observers.clip_std import ClipStdObserver
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.qconfig import QConfig, QConfigPreset, QuantizerSpec
from mq_core.quant.scheme import (
    INT8_SYM,
    INT8_SYM_PER_CHANNEL,
    INT8_SYM_PER_CHANNEL_NARROW,
    SCALE_EPS,
    UINT8_AFFINE,
    UINT8_SYM,
    QuantScheme,
)
from mq_core.runtimes.base import Runtime
from mq_core.runtimes.cpu import SATURATION_NOTE, int8_may_saturate

__all__ = [
    "INT8_SYM",
    "INT8_SYM_PER_CHANNEL",
    "INT8_SYM_PER_CHANNEL_NARROW",
    "PASSTHROUGH_OPS",
    "SATURATION_NOTE",
    "SCALE_EPS",
    "UINT8_AFFINE",
    "UINT8_SYM",
    "Artifact",
    "Backend",
    "CalibrationError",
    "ClipStdObserver",
    "ConfigError",
    "ExportContext",
    "ExportError",
    "ExportResult",
    "Exporter",
    "FakeQuantizer",
    "FusionPattern",
    "Graph",
    "MQError",
    "MinMaxObserver",
    "ModulePredicate",
    "Observer",
    "PTQMethod",
    "PlacementPolicy",
    "QATBnModule",
    "QATModule",
    "QConfig",
    "QConfigPreset",
    "QDQExporter",
    "QDQPair",
    "QuantScheme",
    "QuantTable",
    "QuantizerSpec",
    "Runnable",
    "Runtime",
    "SchemeError",
    "TensorQuant",
    "VerificationError",
    "along_axis",
    "apply_table",
    "bn_scale_factor",
    "channel_view",
    "channels_first",
    "disable_all",
    "fake_quantize",
    "graph_order",
    "hookimpl",
    "in_graph_order",
    "input_placement",
    "int8_may_saturate",
    "make_node",
    "num_inputs",
    "output_placement",
    "prepare_info",
    "propagate_through_passthrough",
    "quantize",
    "quantizers",
    "rebuild_qdq",
    "run_batch",
    "strip_qdq",
    "uncovered_tensors",
    "unsigned_view",
    "weights_as_device_quantizes",
]
