"""Issue 15, item 4: ``mq.quantize`` in one call, ``forward_loop`` wherever calibration data goes, and the public
``mq.RuntimeModule`` that scores the deployed artifact in a real runtime (its worker process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mq_core as mq
from mq_core.demo import digits
from mq_core.pipeline.workflow import resolve_device, to_device
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.observers.percentile import PercentileObserver
from mq_core.testing.zoo import ZOO


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, data: digits.DigitsData):
    """The digits CNN for TensorRT in one call, with an accuracy function."""
    model = digits.pretrained("cnn")
    out = tmp_path_factory.mktemp("api")

    def evaluate(m: torch.nn.Module) -> float:
        return digits.accuracy(m, data.x_test, data.y_test)

    qmodel, result = mq.quantize(model, "tensorrt", data.calibration_batches(4), eval_fn=evaluate, out=out,
                                 observer="percentile")
    return model, qmodel, result, out


def test_one_call_prepares_calibrates_exports_verifies_and_scores(quantized, data: digits.DigitsData) -> None:
    model, qmodel, result, out = quantized
    assert mq.prepare_info(qmodel).backend == "tensorrt" and not hasattr(model, "mq_info")
    assert result.passed, result.table()
    assert result.checkpoint == out / "tensorrt" / "qmodel.pt" and result.checkpoint.is_file()
    assert set(result.reports) == set(result.results) == {"tensorrt", "tensorrt-legacy"}
    assert {a.kind for a in result.artifacts} >= {"onnx-qdq"}
    outcome = result.outcome
    assert result.float_accuracy > 90 and abs(outcome.sim_accuracy - result.float_accuracy) < 3
    assert outcome.deployed_runtime == "onnxruntime"
    # the returned model is the one that was exported: it reproduces the simulated accuracy
    assert digits.accuracy(qmodel, data.x_test, data.y_test) == outcome.sim_accuracy
    assert "tensorrt" in result.table() and result.to_dict()["backends"][0]["passed"] is True
    # out= also receives the report (tests/report has its content)
    assert result.report == out / "report.html" and result.report.is_file() and (out / "report.json").is_file()


def test_observer_choice_applies_to_activations_only(quantized) -> None:
    _, qmodel, result, _ = quantized
    found = mq.quantizers(qmodel)
    assert {type(fq.observer) for fq in found.values() if fq.role == "activation"} == {PercentileObserver}
    assert {type(fq.observer) for fq in found.values() if fq.role == "weight"} == {MinMaxObserver}
    assert result.outcome.qconfig == "tensorrt-default, percentile observer"


def test_runtime_module_scores_the_deployed_artifact_like_mq_quantize(quantized, data: digits.DigitsData) -> None:
    _, qmodel, result, out = quantized
    deployed = mq.RuntimeModule(result, runtime="onnxruntime")
    assert deployed.artifact == "onnx-qdq" and deployed.runtime.name == "onnxruntime"
    assert digits.accuracy(deployed, data.x_test, data.y_test) == result.outcome.deployed_accuracy
    # from the export folder on disk, and from the legacy export (float ONNX + ranges put back as Q/DQ)
    x = data.x_test[:16]
    from_folder = mq.RuntimeModule(out / "tensorrt" / "tensorrt")(x)
    assert torch.equal(from_folder, deployed(x))
    legacy = mq.RuntimeModule(result, exporter="tensorrt-legacy")
    assert (legacy(x).argmax(1) == qmodel(x).argmax(1)).all()


def test_runtime_module_refuses_what_it_cannot_run(quantized) -> None:
    _, _, result, _ = quantized
    onnx_model = mq.RuntimeModule(result).model
    with pytest.raises(mq.ConfigError, match="needs runtime="):
        mq.RuntimeModule(onnx_model)
    with pytest.raises(mq.UnknownNameError):
        mq.RuntimeModule(result, runtime="no-such-runtime")
    with pytest.raises(mq.ConfigError, match="no export by exporter 'qdq'"):
        mq.RuntimeModule(result, exporter="qdq")
    with pytest.raises(mq.ConfigError, match="no runnable artifact 'engine'"):
        mq.RuntimeModule(result, artifact="engine")
    with pytest.raises(mq.ConfigError, match="not a dict"):
        mq.RuntimeModule({})


def test_forward_loop_calibrates_exactly_like_the_data() -> None:
    entry = ZOO["resnet"]
    batches = entry.calibration_data()
    by_data = mq.calibrate(mq.prepare(entry.build(), "qdq", entry.inputs(2)), batches, progress=False)
    calls = []

    def loop(model: torch.nn.Module) -> None:
        calls.append(torch.is_grad_enabled())
        for batch in batches:
            model(batch)

    by_loop = mq.calibrate(mq.prepare(entry.build(), "qdq", entry.inputs(2)), forward_loop=loop)
    assert calls == [False]
    expected = {n: fq.export_qparams() for n, fq in mq.quantizers(by_data).items()}
    for name, fq in mq.quantizers(by_loop).items():
        scale, zero_point = fq.export_qparams()
        assert torch.equal(scale, expected[name][0]) and torch.equal(zero_point, expected[name][1]), name


def test_forward_loop_errors_name_the_call() -> None:
    entry = ZOO["resnet"]
    qmodel = mq.prepare(entry.build(), "qdq", entry.inputs(2))
    with pytest.raises(mq.CalibrationError, match="returned without calling the model"):
        mq.calibrate(qmodel, forward_loop=lambda m: None)
    wrong_shape = r"forward_loop's call 2 of the model: input 0 .* shape \[2, 3, 9, 9\]"
    with pytest.raises(mq.CalibrationError, match=wrong_shape):
        mq.calibrate(qmodel, forward_loop=lambda m: [m(entry.inputs(2)), m(torch.randn(2, 3, 9, 9))])
    with pytest.raises(mq.ConfigError, match="both a forward_loop and data"):
        mq.calibrate(qmodel, entry.calibration_data(), forward_loop=lambda m: None)
    assert not any(fq.is_calibrated for fq in mq.quantizers(qmodel).values())  # a failed pass leaves nothing


def test_quantize_with_a_forward_loop_and_an_input_shape(tmp_path: Path) -> None:
    entry = ZOO["mlp_bn"]
    batches = entry.calibration_data()

    def loop(model: torch.nn.Module) -> None:
        for batch in batches:
            model(batch)

    qmodel, result = mq.quantize(entry.build(), "tensorrt", forward_loop=loop, out=tmp_path, input_shapes=[(3, 16)])
    assert result.passed, result.table()
    checkpoint = mq.load_checkpoint(result.checkpoint)
    assert [s["shape"] for s in checkpoint["inputs"]] == [[3, 16]]
    assert all(fq.is_calibrated for fq in mq.quantizers(qmodel).values())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"forward_loop": lambda m: None}, mq.ConfigError, "exactly one of them"),
    ({"calib_data": None}, mq.ConfigError, "exactly one of them"),
    ({"forward_loop": lambda m: None, "calib_data": None, "method": "adaround"}, mq.ConfigError,
     "needs calibration data"),
    ({"backend": "all"}, mq.ConfigError, "takes one backend"),
    ({"device": "tpu"}, mq.ConfigError, "cpu' or 'cuda"),
    ({"observer": "no-such-observer"}, mq.UnknownNameError, "no-such-observer"),
    ({"calib_data": iter([torch.randn(2, 16)])}, mq.CalibrationError, "one-shot iterator"),
    ({"input_shapes": [(2, 16), (2, 16)]}, mq.ConfigError, "2 input shape"),
])
def test_bad_arguments_fail_before_any_output(tmp_path: Path, kwargs, error, match) -> None:
    entry = ZOO["mlp_bn"]
    call = {"backend": "tensorrt", "calib_data": entry.calibration_data(), "out": tmp_path / "out", **kwargs}
    with pytest.raises(error, match=match):
        mq.quantize(entry.build(), **call)
    assert not (tmp_path / "out" / "tensorrt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(mq.ConfigError, match="sees no CUDA device"):
        resolve_device("cuda")


def test_batches_move_to_the_device_inside_tuples_and_dicts() -> None:
    meta = torch.device("meta")
    batch = {"x": torch.zeros(2, 3), "pair": (torch.ones(1), [torch.ones(2)]), "label": 3}
    moved = to_device(batch, meta)
    assert moved["x"].device == meta and moved["pair"][0].device == meta and moved["pair"][1][0].device == meta
    assert moved["label"] == 3 and isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
