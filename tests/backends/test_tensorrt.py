"""mq-trt: the explicit Q/DQ exporter, the legacy ranges exporter, and the Q/DQ placement lint.

No TensorRT runs here: artifacts are checked against hand-computed golden values, structurally (the lint), and
numerically in ONNX Runtime through ``mq.verify``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mq_trt import lint_qdq, read_calibration_cache, read_dynamic_range
from mq_trt.backend import TENSORRT
from mq_trt.formats import scale_hex, version_token
from mq_trt.implicit import activation_scales, warn_if_weights_differ
from mq_trt.lint import RULES
from onnx import helper, numpy_helper
from torch import nn

import mq_core as mq
from mq_core.export.onnx_graph import Graph
from mq_core.export.ranges import strip_qdq
from mq_core.pipeline.export import export_many
from mq_core.quant.scheme import UINT8_AFFINE
from mq_core.testing import golden
from mq_core.testing.zoo import ZOO

# --- a tiny model with hand-set qparams ---------------------------------------------------------------------------
S_X, S_FLAT = 0.5, 0.1  # activation scales set by hand: x (conv input) and flatten (fc input)
CONV_W = [127 * 2.0**-6, -127 * 2.0**-5]  # max|w| / 127 = 2^-6, 2^-5 exactly: TensorRT's rule gives the same
FC_CODES = np.array([[127, -3, 0, 5, 9, -1, 2, 64], [-127, 1, 1, 0, 0, 0, 8, -8], [3, 127, -127, 0, 1, 1, 1, 1]])
FC_SCALE = 2.0**-7




def tiny_model() -> nn.Module:
    """Conv(1 -> 2, 1x1) -> ReLU -> nn.Flatten -> Linear(8 -> 3), every weight and bias set by hand."""
    return golden.TinyNet(classes=3, flatten_module=True, conv_weight=CONV_W, conv_bias=[0.0, 0.5],
                          fc_weight=FC_CODES * FC_SCALE, fc_bias=[0.25, -0.25, 0.0])


def tiny_inputs() -> torch.Tensor:
    return golden.tiny_inputs(span=(-3.0, 3.0))  # [2, 1, 2, 2], evenly spaced


def prepare_tiny(qconfig: mq.QConfig | None = None, calibrate: bool = True) -> nn.Module:
    qmodel = mq.prepare(tiny_model().eval(), "tensorrt", tiny_inputs(), qconfig=qconfig)
    if calibrate:
        mq.calibrate(qmodel, [tiny_inputs()], progress=False)
    return qmodel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mq.ExportResult]:
    """The tiny model, calibrated, activation scales then set by hand, exported with both exporters."""
    qmodel = prepare_tiny()
    golden.set_qparams(qmodel, {"x_fq": (S_X, 0), "flatten_fq": (S_FLAT, 0)})
    return export_many(qmodel, tiny_inputs(), tmp_path_factory.mktemp("tiny"), ["tensorrt", "tensorrt-legacy"])


def test_plugin_registers_both_exporters() -> None:
    backend = mq.get_backend("trt")
    assert backend.exporters == ("tensorrt", "tensorrt-legacy")
    assert backend.default_exporter == "tensorrt"
    assert {"tensorrt", "tensorrt-legacy"} <= set(mq.list_exporters())
    assert mq.get_exporter("tensorrt-legacy").serves(backend)
    assert not mq.get_exporter("tensorrt").serves(mq.get_backend("qdq"))


def test_weights_were_calibrated_to_tensorrts_rule(tiny: dict[str, mq.ExportResult]) -> None:
    table = tiny["tensorrt"].table
    assert table["conv.weight"].scale.tolist() == [2.0**-6, 2.0**-5]
    assert table["fc.weight"].scale.tolist() == [FC_SCALE] * 3
    assert (table["x"].scale.item(), table["flatten"].scale.item()) == (S_X, np.float32(S_FLAT))


def test_golden_dynamic_range_json(tiny: dict[str, mq.ExportResult]) -> None:
    path = tiny["tensorrt-legacy"].path("dynamic-range")
    assert path.name == "model.dynamic_range.json"
    # amax = 127 * s: 127 * 0.5 = 63.5; float32(0.1) = 0.100000001490116119384765625, times 127 (exact in float64).
    assert json.loads(path.read_text()) == {"tensorrt": {"blob_range": {"x": 63.5, "flatten": 12.700000189244747}}}
    assert read_dynamic_range(path) == {"x": 63.5, "flatten": 12.700000189244747}


def test_golden_calibration_cache(tiny: dict[str, mq.ExportResult]) -> None:
    path = tiny["tensorrt-legacy"].path("calibration-cache")
    assert path.name == "model.calibration.cache"
    # 0.5 = 2^-1: sign 0, exponent 126 = 0b01111110, mantissa 0 -> 0011 1111 0000 ... = 3f000000.
    # 0.1 = 1.6 * 2^-4: exponent 123 = 0b01111011, mantissa 0.6 = 0b1001100110011001100110011.. rounded up in
    # the 23rd bit -> 0 01111011 10011001100110011001101 = 0011 1101 1100 1100 1100 1100 1100 1101 = 3dcccccd.
    # Lines in graph order (network input first); header token of TensorRT 10.0.1 = 10*10000 + 0*100 + 1.
    assert path.read_text() == "TRT-100001-EntropyCalibration2\nx: 3f000000\nflatten: 3dcccccd\n"
    header, scales = read_calibration_cache(path)
    assert header == "TRT-100001-EntropyCalibration2"
    assert scales == {"x": 0.5, "flatten": float(np.float32(0.1))}


def test_golden_float_onnx(tiny: dict[str, mq.ExportResult]) -> None:
    result = tiny["tensorrt-legacy"]
    model = onnx.load(result.path("onnx-float"))
    assert result.path("onnx-float").name == "model.float.onnx"
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "Reshape", "Gemm"]
    graph = Graph(model)
    np.testing.assert_array_equal(graph.array("conv.weight").ravel(), np.float32(CONV_W))
    np.testing.assert_array_equal(graph.array("fc.weight"), np.float32(FC_CODES * FC_SCALE))
    assert result.manifest["options"] == {"name": "model", "trt_version": "10.0.1"}


def test_golden_explicit_onnx(tiny: dict[str, mq.ExportResult]) -> None:
    result = tiny["tensorrt"]
    assert result.exporter == "tensorrt" and result.path("onnx-qdq").name == "model.onnx"
    model = onnx.load(result.path("onnx-qdq"))
    assert [n.op_type for n in model.graph.node] == [
        "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Relu", "Reshape",
        "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Gemm",
    ]
    graph = Graph(model)
    pairs = {p.input: p for p in graph.qdq_pairs()}
    assert set(pairs) == {"x", "flatten", "conv.weight", "fc.weight"}
    assert graph.array(pairs["x"].scale) == np.float32(S_X)
    assert graph.array(pairs["flatten"].scale) == np.float32(S_FLAT)
    np.testing.assert_array_equal(graph.array("conv.weight").ravel(), np.array([127, -127], np.int8))
    np.testing.assert_array_equal(graph.array("fc.weight"), FC_CODES.astype(np.int8))
    np.testing.assert_array_equal(graph.array(pairs["conv.weight"].scale), np.float32([2.0**-6, 2.0**-5]))
    for pair in pairs.values():
        zero = graph.array(pair.zero_point)
        assert zero.dtype == np.int8 and not zero.any()
    assert pairs["conv.weight"].axis == 0 and pairs["fc.weight"].axis == 0
    assert pairs["x"].quantize is not None and pairs["conv.weight"].quantize is None
    assert lint_qdq(model) == []


@pytest.mark.parametrize("exporter", ["tensorrt", "tensorrt-legacy"])
def test_tiny_verifies(tiny: dict[str, mq.ExportResult], exporter: str) -> None:
    report = mq.verify(tiny[exporter], tiny_inputs())
    assert report.passed, report.table()
    # Every quantizer agrees; the float Gemm output differs from torch's by summation order only (< 1e-5 step).
    assert report.worst_steps < 1e-3, report.table()
    expected = ["onnx-qdq"] if exporter == "tensorrt" else ["dynamic-range", "calibration-cache"]
    assert [c.artifact for c in report.checks] == expected


def test_legacy_warns_when_weight_scales_are_not_tensorrts(tiny: dict[str, mq.ExportResult],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    result = tiny["tensorrt-legacy"]
    table = result.table
    table["fc.weight"].scale = table["fc.weight"].scale * 0.75  # as a learned or MSE-searched scale would be
    with caplog.at_level(logging.WARNING, logger="mq_trt"):
        warn_if_weights_differ(onnx.load(result.path("onnx-float")), table)
    assert "quantizes weights itself" in caplog.text and "fc.weight" in caplog.text
    assert "conv.weight" not in caplog.text


# --- the zoo ----------------------------------------------------------------------------------------------------
#: Tensors that input placement quantizes for some consumers only (unet: the skip read by Concat and the conv
#: output read by AveragePool; attention: the residual stream read by LayerNorm). A range is per tensor, so the
#: legacy exporter warns; its verification quantizes them for the INT8 layers only, as the simulation does
#: (quantizing them for every reader instead gives 1.37 and 1.76 steps on these two models).
PARTIALLY_QUANTIZED = {"unet": {"enc1_0", "fuse_0"}, "attention": {"x", "add"}}


class _Messages(logging.Handler):
    """Collects the warnings logged while a module-scoped fixture exports (caplog is per test)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """Each zoo model prepared for tensorrt, calibrated and exported with both exporters (one canonical export).

    Returns ``{"tensorrt": result, "tensorrt-legacy": result, "inputs": x, "warnings": what mq_trt logged}``.
    """
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            z = ZOO[name]
            qmodel = mq.prepare(z.build(), "tensorrt", z.inputs())
            mq.calibrate(qmodel, z.calibration_data(batches=2), progress=False)
            out = tmp_path_factory.mktemp(name)
            warnings = _Messages()
            logging.getLogger("mq_trt").addHandler(warnings)
            try:
                cache[name] = dict(export_many(qmodel, z.inputs(), out, ["tensorrt", "tensorrt-legacy"]))
            finally:
                logging.getLogger("mq_trt").removeHandler(warnings)
            cache[name].update(inputs=z.inputs(), warnings="\n".join(warnings.messages))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_explicit_passes_lint_and_verify(zoo_export: Callable[[str], dict], name: str) -> None:
    exported = zoo_export(name)
    result = exported["tensorrt"]
    assert lint_qdq(onnx.load(result.path("onnx-qdq"))) == []
    report = mq.verify(result, exported["inputs"])
    assert report.passed, report.table()
    # Q/DQ run as written; what is left is float summation order in Conv/Gemm (torch vs ONNX Runtime).
    assert report.worst_steps < 0.01, report.table()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_legacy_ranges_and_verify(zoo_export: Callable[[str], dict], name: str) -> None:
    exported = zoo_export(name)
    result = exported["tensorrt-legacy"]
    float_model = onnx.load(result.path("onnx-float"))
    ops = {n.op_type for n in float_model.graph.node}
    assert not {"QuantizeLinear", "DequantizeLinear"} & ops
    assert ("Clip" in ops) == (name == "mobilenet")  # its ReLU6 survive the Q/DQ stripping
    activations = {k: v for k, v in result.table.items() if v.kind == "activation"}
    amax = read_dynamic_range(result.path("dynamic-range"))
    assert amax == {k: 127 * float(v.scale) for k, v in activations.items()}
    header, scales = read_calibration_cache(result.path("calibration-cache"))
    assert header == "TRT-100001-EntropyCalibration2"
    assert scales == {k: float(v.scale) for k, v in activations.items()}
    partial = PARTIALLY_QUANTIZED.get(name, set())
    assert ("ranges are per tensor" in exported["warnings"]) == bool(partial)
    assert all(f" {t}," in exported["warnings"] or f" {t} " in exported["warnings"] for t in partial)
    assert "quantizes weights itself" not in exported["warnings"]  # minmax weights: TensorRT's own rule
    report = mq.verify(result, exported["inputs"])
    assert report.passed, report.table()
    assert report.worst_steps < 0.01, report.table()  # the files hold the simulated scales exactly
    assert {c.artifact for c in report.checks} == {"dynamic-range", "calibration-cache"}


# --- bad inputs -------------------------------------------------------------------------------------------------
def uint8_qconfig() -> mq.QConfig:
    return mq.QConfig(weight=TENSORRT.qconfig.weight, activation=mq.QuantizerSpec(UINT8_AFFINE, "ema_minmax"),
                      name="uint8-activations")


@pytest.fixture(scope="module")
def uint8_model() -> nn.Module:
    """Prepared for tensorrt (8-bit, so the backend accepts it) but with uint8 asymmetric activations."""
    return prepare_tiny(uint8_qconfig())


def test_explicit_refuses_uint8_activations(uint8_model: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(mq.ExportError) as err:
        mq.export(uint8_model, tiny_inputs(), out)
    message = str(err.value)
    assert "x_QuantizeLinear: [int8] zero point is uint8" in message
    assert "x_QuantizeLinear: [zero-point] zero point [128]" in message  # x spans [-3, 3]
    assert "flatten_QuantizeLinear: [int8]" in message  # after ReLU: zero point 0, still uint8
    assert "int8 symmetric activations" in message and "lint='warn'" in message
    assert list(out.iterdir()) == []  # nothing left behind, not even a staging folder


def test_lint_warn_writes_anyway_and_legacy_refuses(uint8_model: nn.Module, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mq_trt"):
        result = mq.export(uint8_model, tiny_inputs(), tmp_path, lint="warn")
    assert result.path("onnx-qdq").is_file()
    assert "[zero-point]" in caplog.text and "lint='warn'" in caplog.text
    assert mq.verify(result, tiny_inputs()).passed  # the file is what was simulated, just not for TensorRT
    # The legacy exporter's check, on the same table (asymmetric ranges have no amax = 127 * s form).
    float_model, table = strip_qdq(result.qdq_model, result.table)
    with pytest.raises(mq.ExportError, match=r"symmetric int8 per tensor .* x \(uint8 \[0, 255\]"):
        activation_scales(float_model, table)


@pytest.mark.parametrize("exporter", ["tensorrt", "tensorrt-legacy"])
def test_uncalibrated_model_is_refused_and_writes_nothing(exporter: str, tmp_path: Path) -> None:
    qmodel = prepare_tiny(calibrate=False)
    out = tmp_path / "out"
    with pytest.raises(mq.ExportError, match="before calibration"):
        mq.export(qmodel, tiny_inputs(), out, exporter=exporter)
    assert not out.exists()


@pytest.mark.parametrize(("options", "match"), [
    ({"lint": "off"}, "lint must be one of"), ({"trt_version": "ten"}, "trt_version must be"),
    ({"calib": "x"}, "has no option"),
])
def test_bad_options_are_refused_before_exporting(options: dict[str, str], match: str, tmp_path: Path) -> None:
    exporter = "tensorrt-legacy" if "trt_version" in options else "tensorrt"
    with pytest.raises(mq.ConfigError, match=match):
        mq.export(prepare_tiny(calibrate=False), tiny_inputs(), tmp_path, exporter=exporter, **options)


# --- the legacy formats -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "token"), [
    ("10.0.1", "100001"), ("10.3.0", "100300"), ("10.14.1", "101401"), ("8.6.1", "8601"), ("7.1.3", "7103"),
    ("100300", "100300"), ("10.3", "100300"),
])
def test_version_token_follows_nv_tensorrt_version(version: str, token: str) -> None:
    assert version_token(version) == token


def test_scale_hex_is_big_endian_float32_bits() -> None:
    # 1.0: exponent 127 -> 0 01111111 0... = 3f800000; 2^-7 = 0.0078125: exponent 120 -> 3c000000.
    assert (scale_hex(1.0), scale_hex(2.0**-7), scale_hex(0.5)) == ("3f800000", "3c000000", "3f000000")


def test_cache_reader_accepts_tensorrts_own_files(tmp_path: Path) -> None:
    path = tmp_path / "calib.cache"
    # As TensorRT writes it: hex without leading zeros, layer names with spaces and colons.
    path.write_text("TRT-8601-EntropyCalibration2\ninput.1: 3c010a14\n(Unnamed Layer* 64) [Shuffle]_output: 0\n")
    header, scales = read_calibration_cache(path)
    assert header == "TRT-8601-EntropyCalibration2"
    # 3c010a14: exponent 0x78 = 120 -> 2^-7, mantissa 0x010a14 / 2^23.
    assert scales == {"input.1": 2.0**-7 * (1 + 0x010A14 / 2**23), "(Unnamed Layer* 64) [Shuffle]_output": 0.0}


@pytest.mark.parametrize("text", ["", "calibration\nx: 3f000000\n", "TRT-100001-EntropyCalibration2\nx 3f000000\n",
                                  "TRT-100001-EntropyCalibration2\nx: 3f0000001\n"])
def test_cache_reader_refuses_malformed_files(text: str, tmp_path: Path) -> None:
    path = tmp_path / "calib.cache"
    path.write_text(text)
    with pytest.raises(mq.ConfigError):
        read_calibration_cache(path)


@pytest.mark.parametrize("data", [{"blob_range": {"x": 1.0}}, {"tensorrt": {"blob_range": {"x": -1.0}}},
                                  {"tensorrt": {"blob_range": {"x": "big"}}}])
def test_dynamic_range_reader_refuses_malformed_files(data: dict, tmp_path: Path) -> None:
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(data))
    with pytest.raises(mq.ConfigError):
        read_dynamic_range(path)


# --- the lint ---------------------------------------------------------------------------------------------------
class Builder:
    """Builds small Q/DQ ONNX graphs: x [1, 2, 4, 4] float input, int8 Q/DQ helpers, per-channel weights."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def qdq(self, x: str, scale: float = 0.1, zero: int = 0, dtype: type = np.int8, name: str | None = None) -> str:
        name = name or x
        s = self.const(f"{name}_s", np.asarray(scale, np.float32))
        z = self.const(f"{name}_z", np.asarray(zero, dtype))
        q = self.op("QuantizeLinear", [x, s, z], f"{name}_q")
        return self.op("DequantizeLinear", [q, s, z], f"{name}_dq")

    def weight(self, name: str, codes: np.ndarray, scales: np.ndarray | float | None = None, axis: int = 0) -> str:
        codes = np.asarray(codes, np.int8)
        scales = np.full(codes.shape[axis], 0.01, np.float32) if scales is None else np.asarray(scales, np.float32)
        self.const(name, codes)
        self.const(f"{name}_s", scales)
        self.const(f"{name}_z", np.zeros(scales.shape, np.int8))
        return self.op("DequantizeLinear", [name, f"{name}_s", f"{name}_z"], f"{name}_dq", axis=axis)

    def conv_weight(self, name: str = "w", **kw: object) -> str:
        return self.weight(name, np.arange(-2, 2).reshape(2, 2, 1, 1) * 30, **kw)

    def model(self, output: str, inputs: dict[str, list[int]] | None = None) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in
               (inputs or {"x": [1, 2, 4, 4]}).items()]
        out = helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
        return helper.make_model(helper.make_graph(self.nodes, "g", ins, [out], self.inits),
                                 opset_imports=[helper.make_opsetid("", 18)])


def rules(model: onnx.ModelProto) -> set[tuple[str, str]]:
    found = lint_qdq(model)
    assert {v.rule for v in found} <= set(RULES)
    return {(v.node, v.rule) for v in found}


def residual_block(b: Builder, **qdq: object) -> str:
    """x -> Q/DQ -> Conv -> Q/DQ -> Add(+ x Q/DQ) -> Relu: a residual block quantized as TensorRT wants it."""
    x = b.qdq("x", **qdq)
    c = b.op("Conv", [x, b.conv_weight()], "conv")
    return b.op("Relu", [b.op("Add", [b.qdq(c), x], "add")], "y")


def test_lint_accepts_a_well_quantized_graph() -> None:
    b = Builder()
    y = residual_block(b)
    flat = b.qdq(b.op("Flatten", [y], "flat"))
    w = b.weight("fc", np.full((3, 32), 5), axis=0)
    g = b.op("Gemm", [flat, w, b.const("bias", np.zeros(3, np.float32))], "gemm", transB=1)
    w2 = b.weight("w2", np.full((3, 4), -127), axis=1)  # MatMul right operand [K, N]: channels on the last axis
    mm = b.op("MatMul", [b.qdq(g), w2], "mm")
    out = b.op("Add", [mm, b.const("one", np.float32(1.0))], "out")  # a constant Add is not residual
    assert lint_qdq(b.model(out)) == []


def test_uint8_activation_is_named() -> None:
    b = Builder()
    model = b.model(residual_block(b, zero=128, dtype=np.uint8))
    found = rules(model)
    assert {("x_q", "int8"), ("x_q", "zero-point")} <= found
    assert not any(node == "x_dq" for node, _ in found)  # the pair is reported once, on its QuantizeLinear
    assert "zero point is uint8" in str(lint_qdq(model)[0])


def test_nonzero_int8_zero_point_is_named() -> None:
    b = Builder()
    assert rules(b.model(residual_block(b, zero=5))) == {("x_q", "zero-point")}


def test_missing_zero_point_means_uint8() -> None:
    b = Builder()
    s = b.const("s", np.float32(0.1))
    q = b.op("QuantizeLinear", ["x", s], "q")
    dq = b.op("DequantizeLinear", [q, s], "dq")
    assert ("q", "int8") in rules(b.model(b.op("Conv", [dq, b.conv_weight()], "conv")))


def test_runtime_scale_is_named() -> None:
    b = Builder()
    s = b.op("ReduceMax", ["x"], "s", keepdims=0)
    z = b.const("z", np.int8(0))
    dq = b.op("DequantizeLinear", [b.op("QuantizeLinear", ["x", s, z], "q"), s, z], "dq")
    assert ("q", "constant-qparams") in rules(b.model(b.op("Conv", [dq, b.conv_weight()], "conv")))


def test_per_channel_activation_is_named() -> None:
    b = Builder()
    s, z = b.const("s", np.full(2, 0.1, np.float32)), b.const("z", np.zeros(2, np.int8))
    dq = b.op("DequantizeLinear", [b.op("QuantizeLinear", ["x", s, z], "q", axis=1), s, z], "dq", axis=1)
    assert rules(b.model(b.op("Conv", [dq, b.conv_weight()], "conv"))) == {("q", "activation-per-tensor")}


def test_per_tensor_weight_is_named() -> None:
    b = Builder()
    w = b.conv_weight(scales=np.float32(0.01))
    assert rules(b.model(b.op("Conv", [b.qdq("x"), w], "conv"))) == {("w_dq", "weight-per-channel")}


@pytest.mark.parametrize(("op", "axis", "attrs", "codes_shape"), [
    ("Conv", 1, {}, (2, 2, 1, 1)),  # Conv weights are [out, in, kH, kW]
    ("ConvTranspose", 0, {}, (2, 3, 1, 1)),  # ConvTranspose weights are [in, out, kH, kW]
    ("Gemm", 1, {"transB": 1}, (3, 32)),
    ("Gemm", 0, {"transB": 0}, (32, 3)),
])
def test_weight_on_the_wrong_axis_is_named(op: str, axis: int, attrs: dict, codes_shape: tuple[int, ...]) -> None:
    b = Builder()
    x = b.qdq("x")
    if op == "Gemm":
        x = b.qdq(b.op("Flatten", ["x"], "flat"), name="flat")
    w = b.weight("w", np.ones(codes_shape), axis=axis)
    model = b.model(b.op(op, [x, w], "layer", **attrs))
    assert rules(model) == {("w_dq", "weight-per-channel")}
    assert "output channels are on axis" in str(lint_qdq(model)[0])


def test_weight_axis_is_followed_through_transpose() -> None:
    """The exported form of Linear as MatMul: W [out, in] -> Transpose -> MatMul; channels are W's axis 0."""
    b = Builder()
    x = b.qdq("v")
    good = b.op("Transpose", [b.weight("w", np.ones((3, 4)), axis=0)], "wt", perm=[1, 0])
    bad = b.op("Transpose", [b.weight("u", np.ones((3, 4)), axis=1)], "ut", perm=[1, 0])
    y = b.op("Add", [b.op("MatMul", [x, good], "m1"), b.op("MatMul", [x, bad], "m2")], "y")
    assert rules(b.model(y, {"v": [2, 4]})) == {("u_dq", "weight-per-channel"), ("y", "residual-add")}


def test_weight_code_minus_128_is_named() -> None:
    b = Builder()
    w = b.weight("w", np.array([-128, 3, 127, 0]).reshape(2, 2, 1, 1))
    assert rules(b.model(b.op("Conv", [b.qdq("x"), w], "conv"))) == {("w_dq", "weight-narrow-range")}


def test_float_weight_through_quantize_is_checked_too() -> None:
    b = Builder()
    w = b.const("w", np.array([-1.28, 0.5, 1.0, 0.0], np.float32).reshape(2, 2, 1, 1))  # -1.28 / 0.01 -> -128
    s, z = b.const("w_s", np.full(2, 0.01, np.float32)), b.const("w_z", np.zeros(2, np.int8))
    wq = b.op("QuantizeLinear", [w, s, z], "w_q", axis=0)
    wdq = b.op("DequantizeLinear", [wq, s, z], "w_dq", axis=0)
    assert rules(b.model(b.op("Conv", [b.qdq("x"), wdq], "conv"))) == {("w_dq", "weight-narrow-range")}


def test_conv_with_unquantized_input_is_named() -> None:
    b = Builder()
    model = b.model(b.op("Conv", ["x", b.conv_weight()], "conv"))
    assert rules(model) == {("conv", "quantized-inputs")}
    assert "data 'x' is a float tensor" in str(lint_qdq(model)[0])


def test_matmul_with_float_weight_is_named() -> None:
    b = Builder()
    model = b.model(b.op("MatMul", [b.qdq("v"), b.const("w", np.ones((4, 3), np.float32))], "mm"), {"v": [2, 4]})
    assert rules(model) == {("mm", "quantized-inputs")}
    assert "right operand 'w' is a float constant" in str(lint_qdq(model)[0])


def test_a_fully_float_layer_is_left_alone() -> None:
    """prepare(..., skip=["fc"]) leaves a layer float on both inputs: TensorRT runs it in float, not an error."""
    b = Builder()
    conv = b.op("Conv", [b.qdq("x"), b.conv_weight()], "conv")
    assert lint_qdq(b.model(b.op("Conv", [conv, b.const("wf", np.ones((2, 2, 1, 1), np.float32))], "float_conv"))) == []


def test_dequantize_reaches_layers_through_grid_preserving_ops() -> None:
    b = Builder()
    pooled = b.op("MaxPool", [b.qdq("x")], "pool", kernel_shape=[2, 2])
    assert lint_qdq(b.model(b.op("Conv", [pooled, b.conv_weight()], "conv"))) == []


def test_residual_add_with_one_unquantized_input_is_named() -> None:
    b = Builder()
    x = b.qdq("x")
    c = b.op("Conv", [x, b.conv_weight()], "conv")
    model = b.model(b.op("Add", [b.qdq(c), "x"], "add"))
    assert rules(model) == {("add", "residual-add")}
    assert "input 'x' has no Q/DQ" in str(lint_qdq(model)[0])


def test_residual_add_is_found_through_bias_add_and_qdq() -> None:
    b = Builder()
    mm = b.op("MatMul", [b.qdq("v"), b.weight("w", np.ones((4, 4)), axis=1)], "mm")
    biased = b.op("Add", [mm, b.const("b", np.zeros(4, np.float32))], "biased")  # a bias add: not residual
    assert rules(b.model(b.op("Add", ["v", b.qdq(biased)], "res"), {"v": [2, 4]})) == {("res", "residual-add")}


def test_add_of_non_linear_outputs_is_not_residual() -> None:
    b = Builder()
    y = b.op("Add", [b.op("Relu", ["x"], "r"), b.op("Sigmoid", ["x"], "s")], "y")
    assert lint_qdq(b.model(y)) == []


def test_two_scales_on_one_tensor_are_named() -> None:
    b = Builder()
    first = b.qdq("x", scale=0.1, name="a")
    second = b.qdq(b.op("MaxPool", ["x"], "pool", kernel_shape=[2, 2]), scale=0.2, name="b")  # Q moves past it
    same = b.qdq("x", scale=0.1, name="c")
    convs = [b.op("Conv", [t, b.conv_weight(f"w{i}")], f"conv{i}") for i, t in enumerate((first, second, same))]
    model = b.model(b.op("Concat", [convs[0], convs[2]], "cat", axis=1))
    found = lint_qdq(model)
    assert [(v.node, v.rule) for v in found] == [("c_q", "one-scale-per-tensor")]
    assert "tensor 'x' is quantized with 2 different scales" in found[0].message
