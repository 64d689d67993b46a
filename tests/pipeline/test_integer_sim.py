"""Integer-exact simulation (mq.integer_simulation): ONNX Runtime with its integer kernels matches it bit for bit.

The default simulation sums a convolution in float32 and rounds once; ONNX Runtime with its graph optimisations on
(``onnxruntime-opt``) fuses the Q/DQ groups into QLinearConv/QGemm/QLinearAdd, sums in int32 and requantises in
float32. On a ResNet-18-shaped model the default simulation drifts from it by several steps at the logits; the
integer simulation reproduces the kernels' arithmetic, so every quantized tensor agrees exactly, at every depth.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.pipeline.verify import OutputCheck
from mq_core.testing.zoo import ZOO, resnet18

RUNTIME = "onnxruntime-opt"


def _exported(model: torch.nn.Module, folder: Path) -> tuple[mq.ExportResult, torch.Tensor]:
    """W8A8 qdq, calibrated on random 32x32 images, exported; with 8 evaluation images."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    qmodel = mq.prepare(model, "qdq", x[:2])
    mq.calibrate(qmodel, [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)], progress=False)
    return mq.export(qmodel, x[:2], folder), x


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[mq.ExportResult, torch.Tensor]:
    return _exported(resnet18(size=32), tmp_path_factory.mktemp("resnet18"))


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[mq.ExportResult, torch.Tensor]:
    return _exported(ZOO["mobilenet"].build(), tmp_path_factory.mktemp("mobilenet"))


def _end_to_end(result: mq.ExportResult, x: torch.Tensor) -> list[OutputCheck]:
    report = mq.verify(result, x, runtimes=[RUNTIME], tolerance=0, layers=False)
    assert report.checks and not report.failures and not report.skipped, report.table()
    return report.checks


@pytest.mark.parametrize("model, kernels, drift", [("resnet", {"QLinearConv": 20, "QGemm": 1, "QLinearAdd+Relu": 8}, 2),
                                                   ("mobilenet", {"QLinearConv": 10, "QGemm": 1, "QLinearAdd": 2}, 1)])
def test_onnxruntime_integer_kernels_match_bit_for_bit(model: str, kernels: dict[str, int], drift: float,
                                                       request: pytest.FixtureRequest) -> None:
    result, x = request.getfixturevalue(model)
    default = _end_to_end(result, x)
    assert max(c.max_steps for c in default) >= drift and min(c.exact for c in default) < 1.0  # the drift it fixes
    with mq.integer_simulation(result.qmodel) as sim:
        assert Counter(sim.ops.values()) == kernels
        exact = _end_to_end(result, x)
        layers = mq.verify_layers(result, x, runtimes=[RUNTIME])
    assert all(c.max_steps == 0 and c.exact == 1.0 for c in exact), [(c.output, c.max_steps) for c in exact]
    activations = {fq.tensor for fq in mq.quantizers(result.qmodel, weights=False).values()}
    assert {c.tensor for c in layers.checks} == activations
    assert all(c.exact == 1.0 and c.max_steps == 0 for c in layers.checks), [
        (c.tensor, c.exact) for c in layers.checks if c.exact < 1.0]


def test_each_kernel_is_bit_exact_on_many_inputs(tmp_path: Path) -> None:
    """QLinearConv with a bias, a depthwise QLinearConv (ReLU6 fused away) and QGemm, on 256 random images."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10)).eval()
    gen = torch.Generator().manual_seed(1)
    qmodel = mq.prepare(model, "qdq", torch.randn(2, 3, 8, 8))
    mq.calibrate(qmodel, [torch.randn(32, 3, 8, 8, generator=gen)], progress=False)
    result = mq.export(qmodel, torch.randn(2, 3, 8, 8), tmp_path)
    with mq.integer_simulation(qmodel) as sim:
        assert sorted(sim.ops.values()) == ["QGemm", "QLinearConv", "QLinearConv"]
        layers = mq.verify_layers(result, torch.randn(256, 3, 8, 8, generator=gen), runtimes=[RUNTIME])
    assert len(layers.checks) == 4 and all(c.exact == 1.0 for c in layers.checks), [
        (c.tensor, c.exact, c.max_steps) for c in layers.checks]


def test_switching_leaves_the_model_and_its_export_unchanged(resnet: tuple[mq.ExportResult, torch.Tensor],
                                                             tmp_path: Path) -> None:
    result, x = resnet
    qmodel = result.qmodel
    code, state = qmodel.code, qmodel.state_dict()
    sim = mq.integer_simulation(qmodel)
    assert qmodel.code != code and "mq_integer_" in qmodel.code
    assert list(qmodel.state_dict()) == list(state)  # the integer ops hold no parameters or buffers
    try:
        exported = mq.export(qmodel, x[:2], tmp_path)
    finally:
        mq.integer_simulation(qmodel, runtime=None)
    assert exported.path("onnx-qdq").read_bytes() == result.path("onnx-qdq").read_bytes()
    assert qmodel.code == code and not any(n.startswith("mq_integer_") for n, _ in qmodel.named_modules())
    assert sim.runtime == RUNTIME and len(sim.ops) == 29


def test_calibration_sees_the_float_ops(resnet: tuple[mq.ExportResult, torch.Tensor]) -> None:
    """With quantization off (calibration), every integer op computes its float op: the same qparams follow."""
    result, _ = resnet
    qmodel = copy.deepcopy(result.qmodel)
    gen = torch.Generator().manual_seed(0)
    torch.randn(8, 3, 32, 32, generator=gen)  # the evaluation images of the fixture, then its calibration data
    data = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    with mq.integer_simulation(qmodel):
        mq.calibrate(qmodel, data, progress=False)
    before = {n: fq.scale for n, fq in mq.quantizers(result.qmodel).items()}
    assert all(torch.equal(fq.scale, before[n]) for n, fq in mq.quantizers(qmodel).items())


def test_integer_ops_refuse_gradients(resnet: tuple[mq.ExportResult, torch.Tensor]) -> None:
    result, x = resnet
    qmodel = result.qmodel
    with mq.integer_simulation(qmodel):
        with pytest.raises(mq.IntegerSimulationError, match="no gradients"):
            qmodel(x[:1])  # eval mode, but autograd records: parameters require grad
        qmodel.train()
        try:
            with torch.no_grad(), pytest.raises(mq.IntegerSimulationError, match=r"torch\.no_grad"):
                qmodel(x[:1])
        finally:
            qmodel.eval()
        with torch.no_grad():
            assert np.isfinite(qmodel(x[:1]).numpy()).all()
    with pytest.raises(mq.ConfigError, match="onnxruntime-opt"):
        mq.integer_simulation(qmodel, runtime="tvm")
    with pytest.raises(mq.ConfigError, match="prepared model"):
        mq.integer_simulation(torch.nn.Linear(2, 2))


def test_cli_verify_integer_sim(resnet: tuple[mq.ExportResult, torch.Tensor], tmp_path: Path) -> None:
    result, x = resnet
    checkpoint = mq.save_checkpoint(result.qmodel, tmp_path / "ckpt.pt", x[:2],
                                    model_ref="mq_core.testing.zoo:resnet18")
    torch.save(x, tmp_path / "x.pt")
    args = ["verify", str(result.out_dir), "--checkpoint", str(checkpoint), "--trust-model-ref", "--inputs",
            str(tmp_path / "x.pt"), "--tolerance", "0", "--json"]
    runner = CliRunner()
    exact = runner.invoke(cli, [*args, "--integer-sim"])
    assert exact.exit_code == 0, exact.output
    report = json.loads(exact.output)
    assert report["passed"] and {c["runtime"] for c in report["checks"]} == {RUNTIME}
    assert all(c["max_steps"] == 0 and c["exact"] == 1.0 for c in report["checks"]), report["checks"]
    drifting = runner.invoke(cli, [*args, "--runtime", RUNTIME])
    assert max(c["max_steps"] for c in json.loads(drifting.output)["checks"]) >= 2, drifting.output
