"""The canonical QDQ ONNX and the export plumbing: what every exporter starts from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import mq_core as mq
from mq_core.export.canonical import export_qdq_onnx
from mq_core.export.exporter import ExportContext, Exporter
from mq_core.export.onnx_graph import Graph
from mq_core.export.ranges import apply_table, strip_qdq
from mq_core.runtimes.onnxruntime import OnnxRuntime
from mq_core.testing.zoo import ZOO


def calibrated(model: str = "resnet", backend: str = "qdq", qconfig: str | None = None) -> tuple[torch.nn.Module,
                                                                                                    torch.Tensor]:
    entry = ZOO[model]
    x = entry.inputs(2)
    qmodel = mq.prepare(entry.build(), backend, x, qconfig=qconfig)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    return qmodel, x


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory: pytest.TempPathFactory) -> mq.ExportResult:
    qmodel, x = calibrated()
    return mq.export(qmodel, x, tmp_path_factory.mktemp("resnet"))


def test_opset_static_shapes_and_dynamic_batch(resnet_export: mq.ExportResult) -> None:
    model = onnx.load(resnet_export.path("onnx-qdq"))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 13
    (value,) = model.graph.input
    dims = value.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    runtime = OnnxRuntime()
    qmodel = resnet_export.qmodel
    for batch in (1, 5):
        x = ZOO["resnet"].inputs(batch, seed=batch)
        (out,) = runtime.run(model, {"x": x.numpy()})
        assert out.shape == (batch, 10)
        np.testing.assert_array_equal(out, qmodel(x).detach().numpy())


def test_weights_are_integer_initializers_and_qparams_constants(resnet_export: mq.ExportResult) -> None:
    model = onnx.load(resnet_export.path("onnx-qdq"))
    graph = Graph(model)
    pairs = graph.qdq_pairs()
    weights = [p for p in pairs if p.quantize is None]
    assert len(weights) == 11  # 10 convs + fc
    for pair in weights:
        assert graph.array(pair.input).dtype == np.int8
        assert pair.input.endswith(".weight") and pair.axis == 0
    for pair in pairs:
        assert pair.scale in graph.initializers and pair.zero_point in graph.initializers
    # no arithmetic on scales: nothing but Q/DQ reads a scale
    scales = {p.scale for p in pairs}
    readers = {n.op_type for n in model.graph.node for i in n.input if i in scales}
    assert readers == {"QuantizeLinear", "DequantizeLinear"}


def test_quantized_tensors_carry_the_prepared_graph_names(resnet_export: mq.ExportResult) -> None:
    model = onnx.load(resnet_export.path("onnx-qdq"))
    graph = Graph(model)
    placed = {row["tensor"] for row in resnet_export.qmodel.mq_info.placements[""]}
    quantized = {p.input for p in graph.qdq_pairs() if p.quantize is not None}
    assert quantized == placed
    names = {n.name for n in model.graph.node}
    for tensor in placed:
        assert f"{tensor}_QuantizeLinear" in names and f"{tensor}_DequantizeLinear" in names
    assert set(resnet_export.manifest["quantizers"]) == placed | {p.input for p in graph.qdq_pairs()
                                                                  if p.quantize is None}


def test_manifest_describes_files_qparams_and_versions(resnet_export: mq.ExportResult) -> None:
    manifest = json.loads((resnet_export.out_dir / "manifest.json").read_text())
    assert manifest == resnet_export.manifest
    assert (manifest["backend"], manifest["exporter"]) == ("qdq", "qdq")
    (file,) = manifest["files"]
    data = (resnet_export.out_dir / file["path"]).read_bytes()
    assert file["sha256"] == hashlib.sha256(data).hexdigest() and file["bytes"] == len(data)
    assert manifest["inputs"] == [{"name": "x", "shape": ["batch", 3, 16, 16], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "output", "tensor": "fc"}]
    fqs = {fq.qname: fq for fq in mq.quantizers(resnet_export.qmodel).values()}
    for entry in manifest["quantizers"].values():
        scale, zero_point = fqs[entry["quantizer"]].export_qparams()
        np.testing.assert_array_equal(np.atleast_1d(entry["scale"]), np.atleast_1d(scale.numpy()).astype(float))
        np.testing.assert_array_equal(np.atleast_1d(entry["zero_point"]), np.atleast_1d(zero_point.numpy()))
    assert {"mq-core", "torch", "onnx", "python"} <= set(manifest["versions"])


def test_same_model_same_bytes(resnet_export: mq.ExportResult, tmp_path: Path) -> None:
    again = mq.export(resnet_export.qmodel, ZOO["resnet"].inputs(2), tmp_path)
    assert again.path("onnx-qdq").read_bytes() == resnet_export.path("onnx-qdq").read_bytes()
    assert again.manifest == resnet_export.manifest
    assert b"/" not in b"".join(p.value.encode() for p in onnx.load(again.path("onnx-qdq")).metadata_props)


def test_sub_8_bit_grids_are_clamped_in_the_integer_domain_and_relu6_survives() -> None:
    qmodel, x = calibrated("mobilenet", qconfig="w4a4")
    model, table = export_qdq_onnx(qmodel, (x,))
    pairs = Graph(model).qdq_pairs()
    activations = [p for p in pairs if p.quantize is not None]
    assert activations and all(p.clip is not None for p in activations)
    for pair in activations:
        entry = table[pair.input]
        graph = Graph(model)
        assert (entry.qmin, entry.qmax) == (0, 15)
        assert [int(graph.array(i)) for i in pair.clip.input[1:]] == [0, 15]
    codes = [Graph(model).array(p.input) for p in pairs if p.quantize is None]
    assert all(c.min() >= -8 and c.max() <= 7 for c in codes)
    x_test = ZOO["mobilenet"].inputs(3, seed=5)
    (out,) = OnnxRuntime().run(model, {"x": x_test.numpy()})
    np.testing.assert_array_equal(out, qmodel(x_test).detach().numpy())
    relu6 = sum(n.op_type == "Clip" for n in model.graph.node) - len(activations)
    float_model, float_table = strip_qdq(model, table)
    assert sum(n.op_type == "Clip" for n in float_model.graph.node) == relu6 == 7  # the model's ReLU6s stay
    (again,) = OnnxRuntime().run(apply_table(float_model, float_table), {"x": x_test.numpy()})
    np.testing.assert_array_equal(again, out)


def test_narrow_range_weights_export_and_match() -> None:
    qmodel, x = calibrated("mlp_bn", backend="tensorrt")
    model, table = export_qdq_onnx(qmodel, (x,))
    weights = [t for t in table.values() if t.kind == "weight"]
    assert weights and all((t.qmin, t.qmax) == (-127, 127) for t in weights)
    (out,) = OnnxRuntime().run(model, {"x": x.numpy()})
    np.testing.assert_allclose(out, qmodel(x).detach().numpy(), atol=1e-5)


def test_export_before_calibration_leaves_nothing(tmp_path: Path) -> None:
    entry = ZOO["mlp_bn"]
    qmodel = mq.prepare(entry.build(), "qdq", entry.inputs(2))
    with pytest.raises(mq.ExportError, match="before calibration"):
        mq.export(qmodel, entry.inputs(2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bit_widths_the_target_cannot_take_are_refused() -> None:
    entry = ZOO["mlp_bn"]
    with pytest.raises(mq.SchemeError, match="cannot run W4A4"):
        mq.prepare(entry.build(), "tensorrt", entry.inputs(2), qconfig="w4a4")
    base = mq.get_backend("qdq").qconfig
    sixteen = mq.QConfig(base.weight, base.activation.replace(scheme=base.activation.scheme.replace(bits=16)))
    wide = mq.Backend(**{**mq.get_backend("qdq").__dict__, "name": "wide", "activation_bits": frozenset({16})})
    qmodel = mq.prepare(entry.build(), wide, entry.inputs(2), qconfig=sixteen)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    with pytest.raises(mq.ExportError, match="at most 8 bits"):
        export_qdq_onnx(qmodel, (entry.inputs(2),))


class HalfWayExporter(Exporter):
    """Writes one file, then fails: nothing may be left behind."""

    name = "half-way"

    def export(self, ctx: ExportContext) -> None:
        ctx.save_text("first.txt", "written", "text", "a file written before the failure")
        raise mq.ExportError("simulated failure after the first file")


def test_a_failing_exporter_leaves_no_partial_files(tmp_path: Path) -> None:
    qmodel, x = calibrated("mlp_bn")
    with pytest.raises(mq.ExportError, match="simulated failure"):
        mq.export(qmodel, x, tmp_path / "new", exporter=HalfWayExporter())
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(mq.ExportError):
        mq.export(qmodel, x, existing, exporter=HalfWayExporter())
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]


def test_unknown_exporter_options_are_refused(tmp_path: Path) -> None:
    qmodel, x = calibrated("mlp_bn")
    with pytest.raises(mq.ConfigError, match=r"no option\(s\) \['colour'\]"):
        mq.export(qmodel, x, tmp_path, colour="red")
    with pytest.raises(mq.ExportError, match="serves backends"):
        mq.export(qmodel, x, tmp_path, exporter="tensorrt")
