"""mq-tvm: the QDQ and QOperator exporters, the QOperator lowering and the TVM runtime (TVM really runs here).

Golden values are checked on a tiny model with hand-set qparams; the zoo models are exported with both exporters
and verified with the backend's runtimes (TVM relax on llvm, and ONNX Runtime). TVM compiles each model for
seconds, so models are small (zoo inputs, batch 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mq_tvm.lowering import lower_qoperators, requant_multiplier
from mq_tvm.qoperator import to_qoperator
from mq_tvm.runtime import TVMRuntime
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import mq_core as mq
from mq_core.export.onnx_graph import Graph
from mq_core.pipeline.export import export_many
from mq_core.runtimes.onnxruntime import OnnxRuntime
from mq_core.testing import golden
from mq_core.testing.zoo import ZOO

log = logging.getLogger(__name__)

#: Hand-set qparams (scale, zero point), all uint8 affine per tensor (the TVM backend's scheme).
QPARAMS = {
    "x_fq": (0.05, 128),
    "conv.weight_fake_quant": (0.01, 120),
    "conv_fq": (0.02, 0),  # the conv's output after ReLU: zero point == qmin, so the ReLU folds into the grid
    "fc.weight_fake_quant": (0.004, 130),
    "fc_fq": (0.1, 100),
}
CONV_BIAS, FC_BIAS = [0.1234, -0.2, 0.0513], [0.5, -0.25]
#: round(b / (s_x * s_w)) by hand: conv 0.1234 / (0.05 * 0.01) = 246.8 -> 247, -400, 102.6 -> 103;
#: fc 0.5 / (0.02 * 0.004) = 6250, -3125.
CONV_BIAS_CODES, FC_BIAS_CODES = [247, -400, 103], [6250, -3125]
#: The QOperator artifact requantizes integer accumulators (ONNX Runtime's and TVM's arithmetic), so a value on a
#: rounding tie lands one code away from the float simulation: measured at most exactly one code on the zoo, which
#: the default tolerance (1 step, with verify's float margin) accepts.


#: The tiny model: Conv(2 -> 3, 3x3, padding 1) -> ReLU -> nn.Flatten -> Linear(48 -> 2), on [2, 2, 4, 4] inputs,
#: with the biases above.
TINY_SHAPE = {"in_channels": 2, "size": 4}


def tiny_model() -> nn.Module:
    return golden.TinyNet(**TINY_SHAPE, channels=3, kernel=3, padding=1, flatten_module=True, conv_bias=CONV_BIAS,
                          fc_bias=FC_BIAS)


def tiny_inputs() -> torch.Tensor:
    return golden.tiny_inputs(**TINY_SHAPE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mq.ExportResult]:
    """The tiny model, calibrated, then every qparam set by hand (``QPARAMS``); exported with both exporters."""
    torch.manual_seed(0)
    return golden.golden_export(tiny_model().eval(), "tvm", tiny_inputs(), QPARAMS, tmp_path_factory.mktemp("tiny"),
                                every_quantizer=True)


@pytest.fixture
def fast_llvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLVM opt-level 0: compiles in about half the time; outputs were bit-identical to the default "llvm" target
    on every zoo model, and the QOperator outputs are pinned to ONNX Runtime's bit for bit below."""
    monkeypatch.setattr(TVMRuntime, "target", {"kind": "llvm", "opt-level": 0})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_plugin_registers_exporters_and_runtime() -> None:
    assert {"tvm", "tvm-qoperator"} <= set(mq.list_exporters())
    runtime = mq.get_runtime("tvm")
    assert runtime.available()
    assert runtime.domains == {"", "ai.onnx"}
    assert runtime.install == "pip install 'mq-tvm[verify]'"
    assert mq.get_backend("tvm").default_exporter == "tvm"


def test_qoperator_golden_values(tiny: dict[str, mq.ExportResult]) -> None:
    model = onnx.load(tiny["tvm-qoperator"].path("onnx-qoperator"))
    graph = Graph(model)
    assert "Conv" not in _ops(model) and "Relu" not in _ops(model) and "Gemm" not in _ops(model)
    (conv,) = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    x, sx, zx, w, sw, zw, sy, zy, bias = conv.input
    assert (x, conv.output[0]) == ("x_quantized", "conv_quantized")
    assert [float(graph.array(n)) for n in (sx, sw, sy)] == pytest.approx([0.05, 0.01, 0.02])
    assert [int(graph.array(n)) for n in (zx, zw, zy)] == [128, 120, 0]
    assert graph.array(w).dtype == np.uint8 and graph.array(bias).dtype == np.int32
    assert graph.array(bias).tolist() == CONV_BIAS_CODES
    # Linear with bias: MatMulInteger on the flattened conv codes, int32 bias add, float requantization
    (matmul,) = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    (add,) = graph.consumers[matmul.output[0]]
    bias_name = next(i for i in add.input if i != matmul.output[0])
    assert graph.array(bias_name).tolist() == FC_BIAS_CODES
    codes = graph.array(matmul.input[1])
    assert codes.dtype == np.uint8 and codes.shape == (48, 2)


def test_relu_stays_when_the_output_grid_does_not_clamp_at_zero(tiny: dict[str, mq.ExportResult]) -> None:
    qdq = onnx.load(tiny["tvm"].path("onnx-qdq"))
    graph = Graph(qdq)
    (pair,) = [p for p in graph.qdq_pairs() if p.input == "conv"]
    graph.set_initializer("conv_zero_point_10", np.uint8(10))  # the conv output's grid now starts below zero
    pair.quantize.input[2] = pair.dequantize.input[2] = "conv_zero_point_10"
    model, counts = to_qoperator(qdq)
    ops = _ops(model)
    assert counts == {"MatMulInteger": 1} and ["Conv", "Relu", "QuantizeLinear"] == ops[ops.index("Conv"):][:3]
    feeds = {"x": tiny_inputs().numpy()}
    np.testing.assert_array_equal(OnnxRuntime().run(model, feeds)[0], OnnxRuntime().run(qdq, feeds)[0])


@pytest.mark.usefixtures("fast_llvm")
def test_tiny_model_verifies_in_tvm_and_onnxruntime(tiny: dict[str, mq.ExportResult]) -> None:
    for name, result in tiny.items():
        report = mq.verify(result, tiny_inputs())
        log.info("tiny / %s\n%s", name, report.table())
        assert report.passed, report.table()
        assert {c.runtime for c in report.checks} == {"tvm", "onnxruntime"}


def _qlinear_reference(x: np.ndarray, inits: dict[str, np.ndarray]) -> np.ndarray:
    """QLinearConv (stride 2, pad 1, 2 groups) then QLinearMatMul, by the ONNX definition: exact integer
    accumulation (float64 holds these sums exactly), float32 requantization, round half to even, saturate."""
    i = inits
    w = i["w"].astype(np.float64) - i["zw"].astype(np.float64).reshape(-1, 1, 1, 1)
    acc = torch.nn.functional.conv2d(torch.from_numpy(x - np.float64(i["zx"])), torch.from_numpy(w),
                                     torch.from_numpy(i["b"].astype(np.float64)), stride=2, padding=1, groups=2)
    y = np.round(acc.numpy().astype(np.float32) * requant_multiplier(i["sx"], i["sw"], i["sy"]).reshape(-1, 1, 1))
    y = np.clip(y + i["zy"], 0, 255)
    acc = (y.astype(np.int64) - i["zy"]) @ (i["m"].astype(np.int64) - i["zm"])
    z = np.round(acc.astype(np.float32) * requant_multiplier(i["sy"], i["sm"], i["sz"])) + i["zz"]
    return np.clip(z, 0, 255).astype(np.uint8)


def test_lowering_computes_the_integer_operators_exactly() -> None:
    """TVM on the lowered QLinearConv (per-channel int8 weights, bias, stride, groups) and QLinearMatMul gives
    the operators' integer results bit for bit. (ONNX Runtime does not here: on x86 without VNNI its u8 x s8
    kernels saturate int16 pair sums, up to 37 codes off; with uint8 weights, the TVM backend's scheme, it is
    exact, which the zoo test below checks.)"""
    rng = np.random.default_rng(0)
    inits = {
        "sx": np.float32(0.03), "zx": np.uint8(119),
        "w": rng.integers(-127, 128, (4, 2, 3, 3)).astype(np.int8),
        "sw": np.array([0.004, 0.007, 0.002, 0.005], np.float32), "zw": np.zeros(4, np.int8),
        "sy": np.float32(0.11), "zy": np.uint8(90), "b": rng.integers(-3000, 3000, 4).astype(np.int32),
        "m": rng.integers(0, 256, (4, 5)).astype(np.uint8), "sm": np.float32(0.02), "zm": np.uint8(131),
        "sz": np.float32(0.9), "zz": np.uint8(7),
    }
    nodes = [
        helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"],
                         strides=[2, 2], pads=[1, 1, 1, 1], group=2),
        helper.make_node("QLinearMatMul", ["y", "sy", "zy", "m", "sm", "zm", "sz", "zz"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "qops", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4, 9, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.UINT8, [2, 4, 5, 5])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    assert not {"QLinearConv", "QLinearMatMul"} & set(_ops(lower_qoperators(model)))
    x = rng.integers(0, 256, (2, 4, 9, 8)).astype(np.uint8)
    got = TVMRuntime().run(model, {"x": x})[0]
    want = _qlinear_reference(x.astype(np.float64), inits)
    assert got.dtype == np.uint8 and len(np.unique(want)) > 20
    np.testing.assert_array_equal(got, want)


@pytest.mark.usefixtures("fast_llvm")
def test_runtime_caches_compiled_models(tiny: dict[str, mq.ExportResult]) -> None:
    model = onnx.load(tiny["tvm"].path("onnx-qdq"))
    runtime = TVMRuntime()
    feeds = {"x": tiny_inputs().numpy()}
    assert runtime.compile(model, feeds) is runtime.compile(model, feeds)
    assert runtime.compile(model, {"x": tiny_inputs().numpy()[:1]}) is not runtime.compile(model, feeds)


@pytest.mark.usefixtures("fast_llvm")
@pytest.mark.parametrize("model", sorted(ZOO))
def test_zoo_model_verifies_with_both_exporters(model: str, tmp_path: Path) -> None:
    entry = ZOO[model]
    x = entry.inputs(2)
    qmodel = mq.prepare(entry.build(), "tvm", x)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    results = export_many(qmodel, x, tmp_path)
    assert set(results) == {"tvm", "tvm-qoperator"}
    for name, result in results.items():
        report = mq.verify(result, x)
        log.info("%s / %s\n%s", model, name, report.table())
        assert report.passed, report.table()
        assert {c.runtime for c in report.checks} == {"tvm", "onnxruntime"}
    qoperator = onnx.load(results["tvm-qoperator"].path("onnx-qoperator"))
    # every Conv / Linear / matmul of the zoo is integer (max-pools and layout ops moved onto codes)
    assert not {"Conv", "Gemm", "MatMul"} & set(_ops(qoperator)), _ops(qoperator)
    feeds = {"x": x.numpy()}
    np.testing.assert_array_equal(TVMRuntime().run(qoperator, feeds)[0], OnnxRuntime().run(qoperator, feeds)[0])


def test_exporting_uncalibrated_model_raises_and_writes_nothing(tmp_path: Path) -> None:
    qmodel = mq.prepare(tiny_model().eval(), "tvm", tiny_inputs())
    for exporter in ("tvm", "tvm-qoperator"):
        out = tmp_path / exporter
        with pytest.raises(mq.ExportError, match="calibrat"):
            mq.export(qmodel, tiny_inputs(), out, exporter=exporter)
        assert not out.exists()
