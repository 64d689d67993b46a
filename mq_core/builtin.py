"""The core's own plugin: built-in observers, the fixed fake quantizer, generic presets and the ``qdq`` backend.

Registered through the same hooks as third-party plugins (the core eats its own cooking), with provenance
``mq-core``.
"""

from __future__ import annotations

from torch import nn

from mq_core.backend import Backend
from mq_core.export.exporter import Exporter
from mq_core.export.qdq import ORTQDQExporter, QDQExporter
from mq_core.graph.fusion import FusionPattern
from mq_core.graph.patterns import standard_patterns
from mq_core.graph.policy import WEIGHT_KINDS, output_placement
from mq_core.hookspecs import Register, RegisterQATModule, hookimpl
from mq_core.nn.embedding import QEmbedding
from mq_core.nn.qat import QAT_MODULES
from mq_core.quant.fake_quant import FakeQuantizer, FixedFakeQuantizer
from mq_core.quant.observers.base import Observer
from mq_core.quant.observers.clip_std import ClipStdObserver
from mq_core.quant.observers.kl import KLObserver
from mq_core.quant.observers.minmax import EMAMinMaxObserver, MinMaxObserver
from mq_core.quant.observers.mse import MSEObserver
from mq_core.quant.observers.percentile import PercentileObserver
from mq_core.quant.qconfig import QConfig, QConfigPreset, QuantizerSpec
from mq_core.quant.scheme import INT8_SYM_PER_CHANNEL, UINT8_AFFINE
from mq_core.runtimes.base import Runtime
from mq_core.runtimes.onnxruntime import OnnxRuntime, OnnxRuntimeOptimized

QDQ_BACKEND = Backend(
    name="qdq",
    aliases=("onnxruntime", "ort"),
    description="Generic QDQ ONNX for ONNX Runtime (U8 activations x S8 weights fuse into QLinearConv/QGemm); "
    "also the academic target for 2-8 bit research.",
    qconfig=QConfig(
        weight=QuantizerSpec(INT8_SYM_PER_CHANNEL, observer="minmax"),
        activation=QuantizerSpec(UINT8_AFFINE, observer="ema_minmax"),
        name="qdq-default",
    ),
    # ONNX Runtime has no integer LayerNorm or GELU kernel: they run in float, on float inputs; it dequantizes an int8
    # embedding table and gathers from it, so the table is stored quantized, per row (docs/backends/qdq.md)
    placement=output_placement(float_kinds=frozenset({"norm", "gelu"}), weight_kinds=WEIGHT_KINDS | {"embedding"}),
    exporters=("qdq",),
    weight_bits=frozenset(range(2, 9)),
    activation_bits=frozenset(range(2, 9)),
    runtimes=("onnxruntime", "openvino", "tvm"),
    notes="Sub-8-bit grids export as int8/uint8 Q/DQ with the narrower range enforced by a Clip.",
)

PRESETS = (
    QConfigPreset("w8a8", "8-bit weights and activations, the backend's own observers."),
    QConfigPreset(
        "w8a8-pot", "8-bit power-of-two scales, symmetric weights (TVM academic setting, shift-only requant).",
        weight_bits=8, activation_bits=8,
        weight_scheme={"symmetric": True, "signed": True, "pot_scale": True},
        activation_scheme={"pot_scale": True},
    ),
    QConfigPreset(
        "reduce-range", "7-bit weights: ONNX Runtime's u8s8 integer kernels on x86 CPUs without VNNI (AVX2 only) "
        "saturate int16 sums with full 8-bit weights; 7-bit weights avoid it.", weight_bits=7, activation_bits=8,
    ),
    QConfigPreset("w4a8", "4-bit weights (MSE range search), 8-bit activations.", weight_bits=4,
                  activation_bits=8, weight_observer="mse"),
    QConfigPreset("w4a4", "4-bit weights and activations with MSE range search.", weight_bits=4,
                  activation_bits=4, weight_observer="mse", activation_observer="mse"),
    QConfigPreset("w2a4", "2-bit weights, 4-bit activations with MSE range search.", weight_bits=2,
                  activation_bits=4, weight_observer="mse", activation_observer="mse"),
)


@hookimpl
def register_observers(register: Register[type[Observer]]) -> None:
    register(MinMaxObserver, name="minmax")
    register(EMAMinMaxObserver, name="ema_minmax", aliases=("ema",))
    register(PercentileObserver, name="percentile", aliases=("ema_quantile",))
    register(MSEObserver, name="mse")
    register(KLObserver, name="kl", aliases=("entropy", "histogram"))
    register(ClipStdObserver, name="clip_std")


@hookimpl
def register_fake_quantizers(register: Register[type[FakeQuantizer]]) -> None:
    register(FixedFakeQuantizer, name="fixed")


@hookimpl
def register_qconfigs(register: Register[QConfigPreset]) -> None:
    for preset in PRESETS:
        register(preset)


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(QDQ_BACKEND)


@hookimpl
def register_fusion_patterns(register: Register[FusionPattern]) -> None:
    for pattern in standard_patterns():
        register(pattern)


@hookimpl
def register_qat_modules(register: RegisterQATModule) -> None:
    for float_type, qat_type in QAT_MODULES.items():
        register(float_type, qat_type)
    register(nn.Embedding, QEmbedding)  # swapped in only where the backend's policy lists "embedding" weights


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(QDQExporter())
    register(ORTQDQExporter())


@hookimpl
def register_runtimes(register: Register[Runtime]) -> None:
    register(OnnxRuntime())
    register(OnnxRuntimeOptimized())
