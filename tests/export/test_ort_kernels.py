"""The ``qdq-ort`` exporter (``mq_core.export.ort_kernels``): the canonical QDQ ONNX rewritten so that ONNX Runtime
runs more of it in its fast integer kernels, with the same integers, verified like every artifact."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mq_core as mq
from mq_core.export.canonical import export_qdq_onnx
from mq_core.export.ort_kernels import NARROW_CONV_MODES, for_onnxruntime
from mq_core.testing.zoo import TinyResNet, randomize_bn

RUNTIMES = ["onnxruntime", "onnxruntime-opt"]


def stride2_stem() -> nn.Module:
    """An RGB 7x7 stride-2 stem (ResNet's), a 3x3 conv and a pooled Linear head: the shape qdq-ort rewrites."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    randomize_bn(model)
    return model.eval()


def calibrated(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    qmodel = mq.prepare(model, "qdq", x)
    mq.calibrate(qmodel, [x], progress=False)
    return qmodel, x


@pytest.fixture(scope="module")
def stem(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, mq.ExportResult, dict[str, Path]]:
    """The stride-2 stem model on odd-sized inputs (the end padding differs from the start's): its ``qdq-ort``
    export, and the canonical QDQ ONNX (``canonical``) and each ``narrow_convs`` rewrite of it as files."""
    qmodel, x = calibrated(stride2_stem(), (2, 3, 21, 21))
    out = tmp_path_factory.mktemp("qdq-ort")
    result = mq.export(qmodel, x, out / "export", exporter="qdq-ort")
    canonical, _ = export_qdq_onnx(qmodel, (x,))
    files = {"canonical": out / "canonical.onnx"}
    onnx.save(canonical, files["canonical"])
    for mode in NARROW_CONV_MODES:
        files[mode] = out / f"{mode}.onnx"
        onnx.save(for_onnxruntime(canonical, mode)[0], files[mode])
    return qmodel, x, result, files


def ops(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def optimized_ops(path: Path, tmp_path: Path) -> collections.Counter[str]:
    """The op types ONNX Runtime runs after its graph optimisations (fusions and layout)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ops(tmp_path / "optimized.onnx")


def run_optimized(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_stride2_stem_goes_through_space_to_depth_and_the_head_through_global_average_pool(stem) -> None:
    *_, result, files = stem
    assert onnx.load(result.path("onnx-qdq-ort")).SerializeToString() == \
        onnx.load(files["space-to-depth"]).SerializeToString(), "space-to-depth is the default"
    model = onnx.load(files["space-to-depth"])
    assert ops(files["space-to-depth"])["SpaceToDepth"] == 1
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    codes = next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == weight.input[0])
    assert codes.shape == (16, 12, 4, 4) and codes.dtype == np.int8  # 3 channels x 2x2 blocks, 7x7 -> 4x4 taps
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["strides"] == [1, 1] and attrs["pads"] == [0, 0, 0, 0]
    assert ops(files["canonical"])["ReduceMean"] == 1
    for mode in NARROW_CONV_MODES:
        assert ops(files[mode])["ReduceMean"] == 0 and ops(files[mode])["GlobalAveragePool"] == 1
    assert ops(files["pad"])["SpaceToDepth"] == 0 and ops(files["pad"])["Pad"] == 1
    assert ops(files["keep"])["Pad"] == 0 and ops(files["keep"])["SpaceToDepth"] == 0


def test_onnxruntime_runs_every_conv_and_the_pool_as_integer_kernels(stem, tmp_path: Path) -> None:
    *_, files = stem
    canonical = optimized_ops(files["canonical"], tmp_path)
    rewritten = optimized_ops(files["space-to-depth"], tmp_path)
    assert rewritten["QLinearConv"] == 2 and rewritten["Conv"] == 0
    assert rewritten["QLinearGlobalAveragePool"] == 1 and rewritten["ReduceMean"] == 0
    assert canonical["ReduceMean"] == 1, "the canonical head runs its mean in float (what the rewrite fixes)"


def test_conv_rewrites_compute_the_same_integers(stem) -> None:
    _, x, _, files = stem
    reference = run_optimized(files["keep"], x)
    for mode in ("space-to-depth", "pad"):
        np.testing.assert_array_equal(run_optimized(files[mode], x), reference)


def test_rewritten_export_verifies_with_the_stem_checked_locally(stem) -> None:
    _, x, result, _ = stem
    report = mq.verify(result, x, runtimes=RUNTIMES)
    assert report.passed, report.table(layers=True)
    checks = {(c.runtime, c.tensor) for c in report.layers.checks}
    name = onnx.load(result.path("onnx-qdq-ort")).graph.input[0].name  # the network input's quantized tensor
    for runtime in RUNTIMES:
        # the input's DequantizeLinear is restored for verification, so the rewritten conv is cut there
        assert (runtime, name) in checks
        stem_output = next(c for c in report.layers.checks if c.runtime == runtime and c.reads == [name])
        assert stem_output.local_exact is not None and stem_output.local_max_steps <= 1
    assert not report.layers.notes, report.layers.notes


def test_zoo_resnet_with_an_rgb_stride1_stem_pads_its_channels_and_verifies(tmp_path: Path) -> None:
    qmodel, x = calibrated(TinyResNet(width=16).eval(), (2, 3, 16, 16))
    result = mq.export(qmodel, x, tmp_path / "out", exporter="qdq-ort")
    found = ops(result.path("onnx-qdq-ort"))
    assert found["Pad"] == 1 and found["SpaceToDepth"] == 0 and found["GlobalAveragePool"] == 1
    assert result.manifest["exporter"] == "qdq-ort"
    report = mq.verify(result, x, runtimes=RUNTIMES)
    assert report.passed, report.table(layers=True)


def test_unknown_narrow_convs_value_is_refused_before_anything_is_written(stem, tmp_path: Path) -> None:
    qmodel, x, *_ = stem
    with pytest.raises(mq.MQError, match=r"narrow_convs must be one of \['space-to-depth', 'pad', 'keep'\]"):
        mq.export(qmodel, x, tmp_path / "out", exporter="qdq-ort", narrow_convs="s2d")
    assert not (tmp_path / "out").exists()
