"""mq-snpe: float ONNX + AIMET encodings (0.6.1 for SNPE, 1.0.0 for QNN), verified from the file as written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mq_snpe.encodings import from_aimet, read_encodings, to_aimet
from torch import nn

import mq_core as mq
from mq_core.export.ranges import TensorQuant, graph_order, propagate_through_passthrough
from mq_core.pipeline.export import export_many
from mq_core.plugins.lookup import get_entry
from mq_core.quant.scheme import INT8_SYM_PER_CHANNEL, UINT8_AFFINE
from mq_core.testing.golden import TinyNet, set_qparams, tiny_inputs

ZOO_MODELS = ("resnet", "mobilenet", "unet", "mlp_bn", "attention")

# float32 values of the hand-set scales, written as the doubles JSON carries
S_X = 0.10000000149011612  # float32(0.1)
S_RELU = 0.05000000074505806  # float32(0.05)


def _tiny_prepared() -> nn.Module:
    torch.manual_seed(0)
    qconfig = mq.QConfig(mq.QuantizerSpec(INT8_SYM_PER_CHANNEL), mq.QuantizerSpec(UINT8_AFFINE, "ema_minmax"),
                         name="golden")
    return mq.prepare(TinyNet().eval(), "snpe", tiny_inputs(), qconfig=qconfig)


# qparams set by hand on every quantizer: (scale, zero point)
HAND_QPARAMS = {
    "x_fq": (0.1, 3),
    "conv.weight_fake_quant": ([0.0078125, 0.015625], [0, 0]),
    "conv_fq": (0.05, 0),
    "fc.weight_fake_quant": ([0.25, 0.5], [0, 0]),
    "fc_fq": (0.125, 128),
}


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mq.ExportResult]:
    qmodel = _tiny_prepared()
    mq.calibrate(qmodel, [tiny_inputs()], progress=False)
    assert set(mq.quantizers(qmodel)) == set(HAND_QPARAMS)
    set_qparams(qmodel, HAND_QPARAMS)
    return export_many(qmodel, tiny_inputs(), tmp_path_factory.mktemp("golden"), exporters=["snpe", "qnn"])


def _legacy(scale: float, offset: int, symmetric: bool) -> dict:
    return {"bitwidth": 8, "dtype": "int", "is_symmetric": str(symmetric), "offset": offset, "scale": scale,
            "min": offset * scale, "max": (offset + 255) * scale}


def test_golden_snpe_0_6_1(golden: dict[str, mq.ExportResult]) -> None:
    document = json.loads(golden["snpe"].path("encodings").read_text())
    relu = [_legacy(S_RELU, 0, False)]  # conv2d (the conv output, fused with the ReLU) and view (flatten) share it
    assert document == {
        "version": "0.6.1",
        "activation_encodings": {
            "x": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": -3, "scale": S_X,
                   "min": -3 * S_X, "max": 252 * S_X}],
            "conv2d": relu, "conv": relu, "view": relu,
            "output": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": -128, "scale": 0.125,
                        "min": -16.0, "max": 15.875}],
        },
        "param_encodings": {  # int8 symmetric per channel: offset = qmin - z = -128, one entry per output channel
            "conv.weight": [
                {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "offset": -128, "scale": 0.0078125,
                 "min": -1.0, "max": 0.9921875},
                {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "offset": -128, "scale": 0.015625,
                 "min": -2.0, "max": 1.984375},
            ],
            "fc.weight": [_legacy(0.25, -128, True), _legacy(0.5, -128, True)],
        },
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": 8, "param_bitwidth": 8, "dtype": "int", "is_symmetric": True,
                           "per_channel_quantization": True, "quant_scheme": "post_training_tf"},
    }
    assert document["activation_encodings"]["x"][0]["min"] == -0.30000000447034836


def test_golden_qnn_1_0_0(golden: dict[str, mq.ExportResult]) -> None:
    document = json.loads(golden["qnn"].path("encodings").read_text())

    def act(name: str, scale: float, offset: int) -> dict:
        return {"name": name, "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
                "scale": [scale], "offset": [offset]}

    def param(name: str, scales: list[float]) -> dict:
        return {"name": name, "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
                "scale": scales, "offset": [-128] * len(scales)}

    assert document == {
        "version": "1.0.0",
        "activation_encodings": [  # graph (topological) order
            act("x", S_X, -3), act("conv2d", S_RELU, 0), act("conv", S_RELU, 0), act("view", S_RELU, 0),
            act("output", 0.125, -128),
        ],
        "param_encodings": [param("conv.weight", [0.0078125, 0.015625]), param("fc.weight", [0.25, 0.5])],
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": 8, "param_bitwidth": 8, "dtype": "int", "is_symmetric": True,
                           "per_channel_quantization": True, "quant_scheme": "post_training_tf"},
    }


@pytest.mark.parametrize("exporter", ["snpe", "qnn"])
def test_golden_reads_back_and_verifies(golden: dict[str, mq.ExportResult], exporter: str) -> None:
    result = golden[exporter]
    assert {a.path.name for a in result.artifacts} == {"model.float.onnx", "model.encodings"}
    table = read_encodings(result.path("encodings"), {"conv.weight": 0, "fc.weight": 0})
    x = table["x"]
    assert (x.qmin, x.qmax, int(x.zero_point), float(x.scale)) == (0, 255, 3, S_X)
    w = table["fc.weight"]  # int8 symmetric comes back as the same grid on uint8 codes (z = 128)
    assert w.axis == 0 and w.zero_point.tolist() == [128, 128] and w.scale.tolist() == [0.25, 0.5]
    report = mq.verify(result, tiny_inputs())
    assert report.passed and all(c.exact == 1.0 for c in report.checks), report.table()
    reloaded = mq.ExportResult.load(result.out_dir)  # as `mq verify` does later, from the files alone
    assert mq.verify(reloaded, tiny_inputs(), qmodel=result.qmodel).passed


def _names(document: dict) -> dict[str, set[str]]:
    sections = {}
    for section in ("activation_encodings", "param_encodings"):
        value = document[section]
        sections[section] = set(value) if isinstance(value, dict) else {e["name"] for e in value}
    return sections


@pytest.mark.parametrize("exporter", ["snpe", "qnn"])
@pytest.mark.parametrize("model", ZOO_MODELS)
def test_zoo_exports_every_tensor_and_verifies(zoo_exports: Callable, model: str, exporter: str) -> None:
    results, x = zoo_exports("snpe", model)
    result = results[exporter]
    float_model = onnx.load(result.path("onnx-float"))
    tensors = set(graph_order(float_model)) | {i.name for i in float_model.graph.initializer}
    sections = _names(json.loads(result.path("encodings").read_text()))
    written = sections["activation_encodings"] | sections["param_encodings"]
    assert written <= tensors  # under float-ONNX names only
    # every quantizer of the manifest is in the file: weights by name, activations by name or, for the quantized
    # network output, under the graph output's name
    outputs = [o.name for o in float_model.graph.output]
    manifest = result.manifest["quantizers"]
    weights = {n for n, e in manifest.items() if e["kind"] == "weight"}
    assert weights <= sections["param_encodings"]
    activations = {n for n, e in manifest.items() if e["kind"] == "activation"}
    assert len(activations - sections["activation_encodings"]) <= len(outputs)
    assert set(outputs) <= sections["activation_encodings"]  # total integer: the network output too (no crash)
    assert {i.name for i in float_model.graph.input} <= sections["activation_encodings"]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in float_model.graph.node)
    report = mq.verify(result, x)
    assert report.passed, report.table()
    assert all(c.exact == 1.0 for c in report.checks), report.table()  # ORT without optimisations is bit-exact


def test_backend_lists_both_exporters() -> None:
    assert mq.get_backend("qnn").exporters == ("snpe", "qnn")
    for name in ("snpe", "qnn"):
        assert get_entry("exporter", name).distribution == "mq-snpe"
    assert mq.get_exporter("qnn").Options().format == "1.0.0"
    assert mq.get_exporter("snpe").Options().format == "0.6.1"


def test_uncalibrated_model_raises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(mq.ExportError, match="calibrat"):
        mq.export(_tiny_prepared(), tiny_inputs(), out, exporter="snpe")
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("options, message", [({"format": "2.0"}, "0.6.1"), ({"fromat": "1.0.0"}, "format")])
def test_bad_options_raise_config_error(tmp_path: Path, options: dict, message: str) -> None:
    qmodel = _tiny_prepared()
    mq.calibrate(qmodel, [tiny_inputs()], progress=False)
    with pytest.raises(mq.ConfigError, match=message):
        mq.export(qmodel, tiny_inputs(), tmp_path / "out", exporter="snpe", **options)
    assert not (tmp_path / "out").exists()


def _entry(name: str, kind: str = "activation", **grid: object) -> TensorQuant:
    values = {"scale": np.asarray(0.5, np.float32), "zero_point": np.asarray(0), "qmin": 0, "qmax": 255, "bits": 8,
              "signed": False, "symmetric": False, **grid}
    return TensorQuant(name=name, kind=kind, **values)  # type: ignore[arg-type]


def test_narrow_grid_is_refused() -> None:
    narrow = _entry("w", "weight", qmin=-127, qmax=127, signed=True, symmetric=True)
    with pytest.raises(mq.ExportError, match="narrow"):
        to_aimet([narrow], "0.6.1", {})


def test_reader_accepts_aimet_style_and_rejects_inconsistent_files() -> None:
    aimet = {"version": "1.0.0", "activation_encodings": [
        {"name": "a", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [0.5],
         "offset": [-12.0]},
        {"name": "f", "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": 16, "is_sym": True, "scale": [],
         "offset": []}], "param_encodings": []}
    table = from_aimet(aimet)
    assert set(table) == {"a"} and int(table["a"].zero_point) == 12
    bad = {"version": "0.6.1", "activation_encodings": {"a": [_legacy(0.5, -12, False) | {"min": -1.0}]},
           "param_encodings": {}}
    with pytest.raises(mq.ConfigError, match="inconsistent"):
        from_aimet(bad)
    with pytest.raises(mq.ConfigError, match="version"):
        from_aimet({"version": "2.0.0", "encodings": []})


def test_propagation_rules() -> None:
    """Forward through pass-through ops, backward only into single-use non-constant inputs, never over entries."""
    h = onnx.helper
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("Relu", ["c"], ["r"]),
             h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[1, 1]), h.make_node("Conv", ["x", "w"], ["d"]),
             h.make_node("Relu", ["d"], ["s"]), h.make_node("Add", ["d", "p"], ["y"])]
    info = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("x", "y")]
    model = h.make_model(h.make_graph(nodes, "g", info[:1], info[1:], [
        onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")]))
    table = {"r": _entry("r"), "s": _entry("s", scale=np.asarray(0.25, np.float32)), "w": _entry("w", "weight")}
    out = propagate_through_passthrough(model, table)
    assert set(out) == {"r", "s", "w", "c", "p"}  # d feeds two nodes: no backward copy
    assert float(out["c"].scale) == float(out["p"].scale) == 0.5 and out["p"].name == "p"
    assert out["s"] is table["s"]
