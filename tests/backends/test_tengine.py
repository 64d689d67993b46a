"""mq-tengine: float ONNX + Tengine scale table, verified from the table as written with Tengine's weight rule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mq_tengine.exporter import warn_inplace_overrides
from mq_tengine.scale_table import format_scale, format_scale_table, parse_scale_table, read_scale_table
from onnx import numpy_helper
from torch import nn

import mq_core as mq
from mq_core.export.ranges import TensorQuant, graph_order
from mq_core.plugins.lookup import get_entry
from mq_core.testing.golden import TinyNet, set_qparams, tiny_inputs

ZOO_MODELS = ("resnet", "mobilenet", "unet", "mlp_bn", "attention")


def _tiny_prepared() -> nn.Module:
    torch.manual_seed(0)
    return mq.prepare(TinyNet().eval(), "tengine", tiny_inputs())


# qparams set by hand on every quantizer (Tengine_u8: uint8 per-tensor everywhere): (scale, zero point)
HAND_QPARAMS = {
    "x_fq": (0.1, 3),
    "conv.weight_fake_quant": (0.0078125, 128),
    "conv_fq": (0.05, 0),
    "fc.weight_fake_quant": (0.25, 128),
    "fc_fq": (0.125, 128),
}


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> mq.ExportResult:
    qmodel = _tiny_prepared()
    mq.calibrate(qmodel, [tiny_inputs()], progress=False)
    assert set(mq.quantizers(qmodel)) == set(HAND_QPARAMS)
    set_qparams(qmodel, HAND_QPARAMS)
    return mq.export(qmodel, tiny_inputs(), tmp_path_factory.mktemp("golden"))


def test_golden_scale_table(golden: mq.ExportResult) -> None:
    assert golden.exporter == "tengine"
    assert {a.path.name for a in golden.artifacts} == {"model.float.onnx", "model.scale_table.txt"}
    # topological order; conv2d (the conv output) takes the fused ReLU's scale, view (flatten) passes it on;
    # the quantized network output is listed under the graph output's name
    assert golden.path("scale-table").read_text() == (
        "x 0.1 3\n"
        "conv2d 0.05 0\n"
        "conv 0.05 0\n"
        "view 0.05 0\n"
        "output 0.125 128\n"
    )
    table = read_scale_table(golden.path("scale-table"))
    assert float(table["x"].scale) == float(np.float32(0.1)) and int(table["output"].zero_point) == 128


def test_golden_runnable_uses_tengine_weight_rule(golden: mq.ExportResult) -> None:
    float_model = onnx.load(golden.path("onnx-float"))
    weights = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    (runnable,) = mq.get_exporter("tengine").runnables(golden)
    init = {i.name: numpy_helper.to_array(i) for i in runnable.model.graph.initializer}
    for name in ("conv.weight", "fc.weight"):
        w = weights[name]
        lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        assert init[f"{name}_mq_scale"].shape == () and init[f"{name}_mq_zero_point"].dtype == np.uint8
        assert np.isclose(init[f"{name}_mq_scale"], (hi - lo) / 255, rtol=1e-6)
    report = mq.verify(golden, tiny_inputs())
    assert report.passed, report.table()


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_zoo_table_covers_every_activation_and_verifies(zoo_exports: Callable, model: str) -> None:
    results, x = zoo_exports("tengine", model)
    result = results["tengine"]
    float_model = onnx.load(result.path("onnx-float"))
    lines = result.path("scale-table").read_text().splitlines()
    names = [line.split()[0] for line in lines]
    assert all(len(line.split()) == 3 for line in lines) and len(set(names)) == len(names)
    order = graph_order(float_model)
    assert names == [n for n in order if n in set(names)]  # topological order, float-ONNX names only
    outputs = [o.name for o in float_model.graph.output]
    activations = {n for n, e in result.manifest["quantizers"].items() if e["kind"] == "activation"}
    assert len(activations - set(names)) <= len(outputs)  # only a quantized output is renamed (to its graph name)
    assert set(outputs) <= set(names) and float_model.graph.input[0].name in names
    report = mq.verify(result, x)
    assert report.passed, report.table()
    assert all(c.exact == 1.0 for c in report.checks), report.table()


def test_backend_lists_exporter() -> None:
    assert mq.get_backend("tengine").exporters == ("tengine",)
    assert get_entry("exporter", "tengine").distribution == "mq-tengine"


def test_uncalibrated_model_raises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(mq.ExportError, match="calibrat"):
        mq.export(_tiny_prepared(), tiny_inputs(), out)
    assert not out.exists() or not any(out.rglob("*"))


def test_unknown_option_raises_config_error(tmp_path: Path) -> None:
    qmodel = _tiny_prepared()
    mq.calibrate(qmodel, [tiny_inputs()], progress=False)
    with pytest.raises(mq.ConfigError, match="format"):
        mq.export(qmodel, tiny_inputs(), tmp_path / "out", format="2.0")
    assert not (tmp_path / "out").exists()


def test_scales_round_trip_float32_exactly() -> None:
    gen = np.random.default_rng(0)
    scales = (10.0 ** gen.uniform(-9, 3, 2000)).astype(np.float32)
    scales = np.concatenate([scales, np.float32([np.finfo(np.float32).eps, 0.1, 1 / 3, 255.0])])
    text = "".join(f"t{i} {format_scale(s)} {i % 256}\n" for i, s in enumerate(scales))
    assert "e" not in text.lower().replace("t", "")  # positional notation only
    table = parse_scale_table(text)
    assert np.array_equal(np.array([table[f"t{i}"].scale for i in range(len(scales))], np.float32), scales)


def _entry(name: str, **grid: object) -> TensorQuant:
    values = {"scale": np.asarray(0.5, np.float32), "zero_point": np.asarray(0), "qmin": 0, "qmax": 255, "bits": 8,
              "signed": False, "symmetric": False, **grid}
    return TensorQuant(name=name, kind="activation", **values)  # type: ignore[arg-type]


def test_signed_grids_are_written_on_uint8_codes() -> None:
    assert format_scale_table([_entry("a", qmin=-128, qmax=127, signed=True, symmetric=True)]) == "a 0.5 128\n"


@pytest.mark.parametrize("entry, message", [
    (_entry("has space"), "whitespace"),
    (_entry("pc", scale=np.float32([0.5, 0.25]), zero_point=np.array([0, 0]), axis=1), "per channel"),
    (_entry("narrow", qmin=-127, qmax=127, signed=True), "narrow"),
])
def test_unwritable_entries_raise_export_error(entry: TensorQuant, message: str) -> None:
    with pytest.raises(mq.ExportError, match=message):
        format_scale_table([entry])


@pytest.mark.parametrize("text, message", [
    ("a 0.5\n", "expected"), ("a 0.5 3\na 0.5 3\n", "twice"), ("a -1 0\n", "positive"), ("a 0.5 300\n", "integer"),
])
def test_bad_tables_raise_config_error(text: str, message: str) -> None:
    with pytest.raises(mq.ConfigError, match=message):
        parse_scale_table(text)


def test_inplace_override_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    h = onnx.helper
    graph = h.make_graph([h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("MaxPool", ["c"], ["p"],
                                                                             kernel_shape=[1, 1])], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                         [h.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None)])
    table = {"c": _entry("c"), "p": _entry("p", scale=np.asarray(0.25, np.float32))}
    with caplog.at_level(logging.WARNING, logger="mq_tengine.exporter"):
        assert warn_inplace_overrides(h.make_model(graph), table) == ["c"]
    assert "in-place" in caplog.text
    assert warn_inplace_overrides(h.make_model(graph), {**table, "p": _entry("p")}) == []
