"""mq: quantize a PyTorch model for a real target, export what the target consumes, verify it on a runtime.

    import mq_core as mq
    qmodel, result = mq.quantize(model, "tensorrt", loader)  # everything below, and the artifacts' accuracy
    assert result.passed

    backend = mq.get_backend("tensorrt")
    qmodel = mq.prepare(model, backend, example_inputs=(x,))
    mq.calibrate(qmodel, loader)
    result = mq.export(qmodel, (x,), "deploy/")
    report = mq.verify(result, (x,))

Names load lazily, on first use: ``import mq_core`` (and so ``mq --help``) does not import torch; the first name
that needs it does.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from mq_core._version import __version__

if TYPE_CHECKING:
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
    from mq_core.graph.integer_sim import IntegerSimulationError, integer_simulation
    from mq_core.graph.policy import PlacementPolicy, input_placement, output_placement
    from mq_core.hookspecs import hookimpl
    from mq_core.nn import FrozenBatchNorm2d, freeze_bn, unfreeze_bn
    from mq_core.pipeline.calibrate import calibrate
    from mq_core.pipeline.export import export
    from mq_core.pipeline.prepare import PrepareInfo, prepare, prepare_info
    from mq_core.pipeline.ptq import PTQMethod, ptq
    from mq_core.pipeline.quantize import quantize
    from mq_core.pipeline.resolve import resolve_qconfig
    from mq_core.pipeline.runtime_module import RuntimeModule
    from mq_core.pipeline.sensitivity import SensitivityReport, sensitivity
    from mq_core.pipeline.verify import VerificationReport, verify
    from mq_core.pipeline.verify_layers import LayerReport, TensorCheck, verify_layers
    from mq_core.pipeline.workflow import BackendOutcome, QuantizeSummary
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

#: The module each public name is defined in (internal places that may move; this table follows them).
_HOMES: dict[str, str] = {
    "Artifact": "mq_core.export",
    "Backend": "mq_core.backend",
    "BackendOutcome": "mq_core.pipeline.workflow",
    "CalibrationError": "mq_core.errors",
    "ConfigError": "mq_core.errors",
    "ExportError": "mq_core.errors",
    "ExportResult": "mq_core.export",
    "Exporter": "mq_core.export",
    "FakeQuantizer": "mq_core.quant.fake_quant",
    "FixedFakeQuantizer": "mq_core.quant.fake_quant",
    "FrozenBatchNorm2d": "mq_core.nn",
    "IntegerSimulationError": "mq_core.graph.integer_sim",
    "LayerReport": "mq_core.pipeline.verify_layers",
    "MQError": "mq_core.errors",
    "MixedPrecisionResult": "mq_core.pipeline.mixed_precision",
    "Observer": "mq_core.quant.observers.base",
    "PTQMethod": "mq_core.pipeline.ptq",
    "PlacementPolicy": "mq_core.graph.policy",
    "PluginConflictError": "mq_core.errors",
    "PrepareInfo": "mq_core.pipeline.prepare",
    "QConfig": "mq_core.quant.qconfig",
    "QConfigPreset": "mq_core.quant.qconfig",
    "QuantScheme": "mq_core.quant.scheme",
    "QuantizeSummary": "mq_core.pipeline.workflow",
    "QuantizerSpec": "mq_core.quant.qconfig",
    "Runtime": "mq_core.runtimes.base",
    "RuntimeModule": "mq_core.pipeline.runtime_module",
    "SchemeError": "mq_core.errors",
    "SensitivityReport": "mq_core.pipeline.sensitivity",
    "TensorCheck": "mq_core.pipeline.verify_layers",
    "TraceError": "mq_core.errors",
    "UnknownNameError": "mq_core.errors",
    "VerificationError": "mq_core.errors",
    "VerificationReport": "mq_core.pipeline.verify",
    "calibrate": "mq_core.pipeline.calibrate",
    "disable_all": "mq_core.quant.switches",
    "enable_calibration": "mq_core.quant.switches",
    "enable_quantization": "mq_core.quant.switches",
    "export": "mq_core.pipeline.export",
    "freeze_bn": "mq_core.nn",
    "get_backend": "mq_core.plugins.lookup",
    "get_entry": "mq_core.plugins.lookup",
    "get_exporter": "mq_core.plugins.lookup",
    "get_fake_quantizer": "mq_core.plugins.lookup",
    "get_observer": "mq_core.plugins.lookup",
    "get_ptq_method": "mq_core.plugins.lookup",
    "get_qconfig": "mq_core.plugins.lookup",
    "get_runtime": "mq_core.plugins.lookup",
    "hookimpl": "mq_core.hookspecs",
    "input_placement": "mq_core.graph.policy",
    "integer_simulation": "mq_core.graph.integer_sim",
    "list_backends": "mq_core.plugins.lookup",
    "list_exporters": "mq_core.plugins.lookup",
    "list_fake_quantizers": "mq_core.plugins.lookup",
    "list_observers": "mq_core.plugins.lookup",
    "list_ptq_methods": "mq_core.plugins.lookup",
    "list_qconfigs": "mq_core.plugins.lookup",
    "list_runtimes": "mq_core.plugins.lookup",
    "load_checkpoint": "mq_core.checkpoint",
    "output_placement": "mq_core.graph.policy",
    "prepare": "mq_core.pipeline.prepare",
    "prepare_info": "mq_core.pipeline.prepare",
    "ptq": "mq_core.pipeline.ptq",
    "quantize": "mq_core.pipeline.quantize",
    "quantizers": "mq_core.quant.switches",
    "resolve_qconfig": "mq_core.pipeline.resolve",
    "restore": "mq_core.checkpoint",
    "save_checkpoint": "mq_core.checkpoint",
    "search_mixed_precision": "mq_core.pipeline.mixed_precision",
    "sensitivity": "mq_core.pipeline.sensitivity",
    "summary": "mq_core.summary",
    "unfreeze_bn": "mq_core.nn",
    "verify": "mq_core.pipeline.verify",
    "verify_layers": "mq_core.pipeline.verify_layers",
}

__all__ = [
    "Artifact",
    "Backend",
    "BackendOutcome",
    "CalibrationError",
    "ConfigError",
    "ExportError",
    "ExportResult",
    "Exporter",
    "FakeQuantizer",
    "FixedFakeQuantizer",
    "FrozenBatchNorm2d",
    "IntegerSimulationError",
    "LayerReport",
    "MQError",
    "MixedPrecisionResult",
    "Observer",
    "PTQMethod",
    "PlacementPolicy",
    "PluginConflictError",
    "PrepareInfo",
    "QConfig",
    "QConfigPreset",
    "QuantScheme",
    "QuantizeSummary",
    "QuantizerSpec",
    "Runtime",
    "RuntimeModule",
    "SchemeError",
    "SensitivityReport",
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
    "integer_simulation",
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
    "quantize",
    "quantizers",
    "resolve_qconfig",
    "restore",
    "save_checkpoint",
    "search_mixed_precision",
    "sensitivity",
    "summary",
    "unfreeze_bn",
    "verify",
    "verify_layers",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``mq_core.export`` and ``mq_core.summary`` the functions: importing the sub-package ``mq_core.export``
    or the module ``mq_core.summary`` for the first time binds it as an attribute of this package, which would hide
    the function of the same name (eager imports used to overwrite that binding)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _HOMES:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
