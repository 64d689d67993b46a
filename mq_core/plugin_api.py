"""The public API for plugin authors: everything a backend, exporter, runtime, observer, quantizer or PTQ method
needs, in one module.

Import from here (or from the top-level ``mq_core`` names), never from mq's internal modules: those move between
releases, these names do not. Stability: every name in ``__all__`` of this module and of ``mq_core`` is kept
compatible within a minor series; a name is removed or changed incompatibly only after one minor release in which
using it raises a ``DeprecationWarning``. ``mq_core.testing`` (the zoo, the golden helpers, the conformance kit
and its pytest fixtures) is public too. Everything else under ``mq_core`` is internal.

Names load lazily, on first use: a runtime plugin that imports ``Runtime`` from here does not import torch, so
the worker processes that run runtimes (``mq_core/runtimes/isolation.py``) start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mq_core.backend import Backend
    from mq_core.errors import (
        CalibrationError,
        ConfigError,
        ExportError,
        MQError,
        SchemeError,
        VerificationError,
        check_choice,
    )
    from mq_core.export.exporter import Artifact, ExportContext, Exporter, ExportResult, Runnable
    from mq_core.export.onnx_graph import Graph, QDQPair, make_node
    from mq_core.export.qdq import QDQExporter
    from mq_core.export.ranges import (
        PASSTHROUGH_OPS,
        QuantTable,
        TensorQuant,
        apply_table,
        graph_order,
        in_graph_order,
        propagate_through_passthrough,
        strip_qdq,
        uncovered_tensors,
        unsigned_view,
        weights_as_device_quantizes,
    )
    from mq_core.export.ranges_file import RangesFile, RangesFileExporter, rebuild_qdq
    from mq_core.graph.fusion import FusionPattern, ModulePredicate
    from mq_core.graph.policy import PlacementPolicy, input_placement, output_placement
    from mq_core.hookspecs import Register, RegisterQATModule, hookimpl
    from mq_core.nn.bn_fold import bn_scale_factor, channel_view
    from mq_core.nn.qat import QATBnModule, QATModule
    from mq_core.pipeline.calibrate import CalibrationData, all_reduce, model_inputs, num_inputs, run_batch
    from mq_core.pipeline.prepare import prepare_info
    from mq_core.pipeline.ptq import PTQMethod
    from mq_core.pipeline.resolve import resolve_qconfig
    from mq_core.plugins.manager import reset as reset_plugins
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
    from mq_core.quant.switches import disable_all, quantizers
    from mq_core.runtimes.base import Runtime
    from mq_core.runtimes.cpu import SATURATION_NOTE, int8_may_saturate
    from mq_core.text import shorten

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
    "CalibrationData",
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
    "RangesFile",
    "RangesFileExporter",
    "Register",
    "RegisterQATModule",
    "Runnable",
    "Runtime",
    "SchemeError",
    "TensorQuant",
    "VerificationError",
    "all_reduce",
    "along_axis",
    "apply_table",
    "bn_scale_factor",
    "channel_view",
    "channels_first",
    "check_choice",
    "disable_all",
    "fake_quantize",
    "graph_order",
    "hookimpl",
    "in_graph_order",
    "input_placement",
    "int8_may_saturate",
    "make_node",
    "model_inputs",
    "num_inputs",
    "output_placement",
    "prepare_info",
    "propagate_through_passthrough",
    "quantize",
    "quantizers",
    "rebuild_qdq",
    "reset_plugins",
    "resolve_qconfig",
    "run_batch",
    "shorten",
    "strip_qdq",
    "uncovered_tensors",
    "unsigned_view",
    "weights_as_device_quantizes",
]

#: Where each public name lives, as (module, attribute): internal places that may move; this table follows them.
_HOMES: dict[str, tuple[str, str]] = {
    "Backend": ("mq_core.backend", "Backend"),
    "CalibrationError": ("mq_core.errors", "CalibrationError"),
    "ConfigError": ("mq_core.errors", "ConfigError"),
    "ExportError": ("mq_core.errors", "ExportError"),
    "MQError": ("mq_core.errors", "MQError"),
    "SchemeError": ("mq_core.errors", "SchemeError"),
    "VerificationError": ("mq_core.errors", "VerificationError"),
    "check_choice": ("mq_core.errors", "check_choice"),
    "Artifact": ("mq_core.export.exporter", "Artifact"),
    "ExportContext": ("mq_core.export.exporter", "ExportContext"),
    "ExportResult": ("mq_core.export.exporter", "ExportResult"),
    "Exporter": ("mq_core.export.exporter", "Exporter"),
    "Runnable": ("mq_core.export.exporter", "Runnable"),
    "Graph": ("mq_core.export.onnx_graph", "Graph"),
    "QDQPair": ("mq_core.export.onnx_graph", "QDQPair"),
    "make_node": ("mq_core.export.onnx_graph", "make_node"),
    "QDQExporter": ("mq_core.export.qdq", "QDQExporter"),
    "QuantTable": ("mq_core.export.ranges", "QuantTable"),
    "TensorQuant": ("mq_core.export.ranges", "TensorQuant"),
    "apply_table": ("mq_core.export.ranges", "apply_table"),
    "strip_qdq": ("mq_core.export.ranges", "strip_qdq"),
    "weights_as_device_quantizes": ("mq_core.export.ranges", "weights_as_device_quantizes"),
    "PASSTHROUGH_OPS": ("mq_core.export.ranges", "PASSTHROUGH_OPS"),
    "graph_order": ("mq_core.export.ranges", "graph_order"),
    "in_graph_order": ("mq_core.export.ranges", "in_graph_order"),
    "propagate_through_passthrough": ("mq_core.export.ranges", "propagate_through_passthrough"),
    "rebuild_qdq": ("mq_core.export.ranges_file", "rebuild_qdq"),
    "uncovered_tensors": ("mq_core.export.ranges", "uncovered_tensors"),
    "unsigned_view": ("mq_core.export.ranges", "unsigned_view"),
    "RangesFile": ("mq_core.export.ranges_file", "RangesFile"),
    "RangesFileExporter": ("mq_core.export.ranges_file", "RangesFileExporter"),
    "FusionPattern": ("mq_core.graph.fusion", "FusionPattern"),
    "ModulePredicate": ("mq_core.graph.fusion", "ModulePredicate"),
    "PlacementPolicy": ("mq_core.graph.policy", "PlacementPolicy"),
    "input_placement": ("mq_core.graph.policy", "input_placement"),
    "output_placement": ("mq_core.graph.policy", "output_placement"),
    "Register": ("mq_core.hookspecs", "Register"),
    "RegisterQATModule": ("mq_core.hookspecs", "RegisterQATModule"),
    "hookimpl": ("mq_core.hookspecs", "hookimpl"),
    "bn_scale_factor": ("mq_core.nn.bn_fold", "bn_scale_factor"),
    "channel_view": ("mq_core.nn.bn_fold", "channel_view"),
    "QATBnModule": ("mq_core.nn.qat", "QATBnModule"),
    "QATModule": ("mq_core.nn.qat", "QATModule"),
    "CalibrationData": ("mq_core.pipeline.calibrate", "CalibrationData"),
    "all_reduce": ("mq_core.pipeline.calibrate", "all_reduce"),
    "model_inputs": ("mq_core.pipeline.calibrate", "model_inputs"),
    "num_inputs": ("mq_core.pipeline.calibrate", "num_inputs"),
    "run_batch": ("mq_core.pipeline.calibrate", "run_batch"),
    "prepare_info": ("mq_core.pipeline.prepare", "prepare_info"),
    "PTQMethod": ("mq_core.pipeline.ptq", "PTQMethod"),
    "resolve_qconfig": ("mq_core.pipeline.resolve", "resolve_qconfig"),
    "reset_plugins": ("mq_core.plugins.manager", "reset"),
    "FakeQuantizer": ("mq_core.quant.fake_quant", "FakeQuantizer"),
    "along_axis": ("mq_core.quant.functional", "along_axis"),
    "fake_quantize": ("mq_core.quant.functional", "fake_quantize"),
    "quantize": ("mq_core.quant.functional", "quantize"),
    "Observer": ("mq_core.quant.observers.base", "Observer"),
    "channels_first": ("mq_core.quant.observers.base", "channels_first"),
    "ClipStdObserver": ("mq_core.quant.observers.clip_std", "ClipStdObserver"),
    "MinMaxObserver": ("mq_core.quant.observers.minmax", "MinMaxObserver"),
    "QConfig": ("mq_core.quant.qconfig", "QConfig"),
    "QConfigPreset": ("mq_core.quant.qconfig", "QConfigPreset"),
    "QuantizerSpec": ("mq_core.quant.qconfig", "QuantizerSpec"),
    "INT8_SYM": ("mq_core.quant.scheme", "INT8_SYM"),
    "INT8_SYM_PER_CHANNEL": ("mq_core.quant.scheme", "INT8_SYM_PER_CHANNEL"),
    "INT8_SYM_PER_CHANNEL_NARROW": ("mq_core.quant.scheme", "INT8_SYM_PER_CHANNEL_NARROW"),
    "QuantScheme": ("mq_core.quant.scheme", "QuantScheme"),
    "SCALE_EPS": ("mq_core.quant.scheme", "SCALE_EPS"),
    "UINT8_AFFINE": ("mq_core.quant.scheme", "UINT8_AFFINE"),
    "UINT8_SYM": ("mq_core.quant.scheme", "UINT8_SYM"),
    "disable_all": ("mq_core.quant.switches", "disable_all"),
    "quantizers": ("mq_core.quant.switches", "quantizers"),
    "Runtime": ("mq_core.runtimes.base", "Runtime"),
    "SATURATION_NOTE": ("mq_core.runtimes.cpu", "SATURATION_NOTE"),
    "int8_may_saturate": ("mq_core.runtimes.cpu", "int8_may_saturate"),
    "shorten": ("mq_core.text", "shorten"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _HOMES[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
