"""Issue 15, item 2: mixed precision under a budget (``mq.search_mixed_precision``, ``--accuracy-budget``).

Done when: ``--accuracy-budget 1`` on the digits residual net, starting from W2A4 (where uniform bits lose tens of
points), finds a mixed assignment within the budget with fewer 8-bit layers than "all 8-bit"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.demo import digits
from mq_core.testing.zoo import MLPBN

pytestmark = pytest.mark.usefixtures("deterministic")

RESULT_KEYS = {"budget", "metric", "reference", "assignment", "score", "size_bytes", "size_all8_bytes", "counts",
               "steps"}


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return digits.pretrained("resnet")


def accuracy(data: digits.DigitsData):
    return lambda model: digits.accuracy(model, data.x_test, data.y_test)


@pytest.fixture(scope="module")
def searched(resnet, data) -> mq.MixedPrecisionResult:
    torch.set_num_threads(1)  # module-scoped: runs before the per-test "deterministic" fixture
    calib = data.calibration_batches()
    return mq.search_mixed_precision(resnet, "qdq", (calib[0],), calib, accuracy_budget=1.0,
                                     eval_fn=accuracy(data), qconfig="w2a4")


def test_uniform_w2a4_loses_tens_of_points_on_the_residual_net(resnet, data) -> None:
    calib = data.calibration_batches()
    qmodel = mq.calibrate(mq.prepare(resnet, "qdq", (calib[0],), qconfig="w2a4"), calib, progress=False)
    assert digits.accuracy(resnet, data.x_test, data.y_test) - digits.accuracy(qmodel, data.x_test, data.y_test) > 20


def test_budget_1_from_w2a4_is_met_with_fewer_8_bit_layers_than_all_8_bit(searched, resnet, data) -> None:
    float_accuracy = digits.accuracy(resnet, data.x_test, data.y_test)
    assert searched.metric == "eval" and searched.reference == float_accuracy
    assert searched.within_budget and searched.score >= float_accuracy - 1.0
    layers = searched.assignment
    assert set(layers) == {"stem.0", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "head.2",
                           "relu_1", "relu_3", "head.0"}
    assert searched.counts.get("w8a8", 0) < len(layers)  # "all 8-bit" has every layer at w8a8
    assert "w2a4" in searched.counts or "w4a4" in searched.counts
    assert searched.size_bytes < searched.size_all8_bytes == sum(
        m.weight.numel() for m in resnet.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
    # the moves replay to the assignment: every step starts where the layer was
    replay = dict.fromkeys(layers, "w2a4")
    for step in searched.steps:
        assert replay[step["layer"]] == step["from"]
        replay[step["layer"]] = step["to"]
    assert replay == layers and searched.steps[-1]["score"] == searched.score


def test_the_chosen_qconfig_prepares_the_model_the_search_scored(searched, resnet, data) -> None:
    """Calibration observes float tensors, so the search's assembled candidates are the calibrated model exactly."""
    calib = data.calibration_batches()
    qmodel = mq.calibrate(mq.prepare(resnet, "qdq", (calib[0],), qconfig=searched.qconfig), calib, progress=False)
    bits = {fq.layer: fq.scheme.bits for fq in mq.quantizers(qmodel, activations=False).values()}
    assert bits == {layer: int(name[1]) for layer, name in searched.assignment.items() if layer in bits}
    assert digits.accuracy(qmodel, data.x_test, data.y_test) == searched.score


def test_result_dict_is_the_shared_schema_and_json(searched) -> None:
    data = searched.to_dict()
    assert set(data) == RESULT_KEYS
    assert json.loads(json.dumps(data)) == data
    assert all(set(step) == {"layer", "from", "to", "score"} for step in data["steps"])
    assert sum(data["counts"].values()) == len(data["assignment"])


def test_sqnr_budget_without_eval_is_measured_from_all_8_bit(data) -> None:
    model, calib = digits.pretrained("cnn"), data.calibration_batches(4)
    result = mq.search_mixed_precision(model, "qdq", (calib[0],), calib, accuracy_budget=3.0, qconfig="w4a8",
                                       candidates=("w8a8",))
    assert result.metric == "sqnr_db" and result.within_budget
    all8 = mq.calibrate(mq.prepare(model, "qdq", (calib[0],), qconfig="w8a8"), calib, progress=False)
    with torch.no_grad():
        reference = torch.cat([model(b) for b in calib[:4]]).double()
        noise = torch.cat([all8(b) for b in calib[:4]]).double() - reference
    assert result.reference == pytest.approx(10 * torch.log10(reference.square().sum() / noise.square().sum()).item(),
                                             abs=1e-3)
    assert set(result.counts) <= {"w4a8", "w8a8", "float"}


def test_layers_fall_back_to_float_when_8_bits_is_not_enough(data) -> None:
    model, calib = digits.pretrained("cnn"), data.calibration_batches(2)
    x = data.x_test[:64]
    with torch.no_grad():
        expected = model(x)

    def closeness(m: torch.nn.Module) -> float:  # 100 for the float model; any quantized layer costs > 0.05
        with torch.no_grad():
            return 100.0 - 1000.0 * float((m(x) - expected).square().mean())

    result = mq.search_mixed_precision(model, "qdq", (calib[0],), calib, accuracy_budget=0.05, eval_fn=closeness,
                                       qconfig="w4a8", candidates=("w8a8",))
    assert result.within_budget and "float" in result.counts
    assert any(step["to"] == "float" for step in result.steps)
    assert result.size_bytes > result.size_all8_bytes  # a float weight takes 4 bytes
    qmodel = mq.prepare(model, "qdq", (calib[0],), qconfig=result.qconfig)
    floats = [layer for layer, name in result.assignment.items() if name == "float"]
    assert not any(fq.layer in floats for fq in mq.quantizers(qmodel).values())


def test_bad_budgets_and_starts_are_refused(data) -> None:
    model, calib = digits.pretrained("cnn"), data.calibration_batches(1)
    with pytest.raises(mq.ConfigError, match="accuracy_budget must be a finite number"):
        mq.search_mixed_precision(model, "qdq", (calib[0],), calib, accuracy_budget=-1)
    with pytest.raises(mq.ConfigError, match="not a dict"):
        mq.search_mixed_precision(model, "qdq", (calib[0],), calib, accuracy_budget=1, qconfig={"*": "w4a8"})
    with pytest.raises(mq.SchemeError, match="cannot run W4A4"):
        mq.search_mixed_precision(model, "tensorrt", (calib[0],), calib, accuracy_budget=1, candidates=("w4a4",))


def test_mq_quantize_with_a_budget_prints_and_exports_the_choice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, calib = MLPBN().eval(), torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))

    def agreement(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return 100.0 * float((m(x).argmax(1) == model(x).argmax(1)).float().mean())

    _qmodel, result = mq.quantize(model, "qdq", calib, eval_fn=agreement, qconfig="w2a4", accuracy_budget=2,
                                  out=tmp_path, report=False)
    mixed = result.mixed_precision
    assert mixed is not None and mixed.within_budget and result.passed
    assert result.outcome.to_dict()["mixed_precision"] == mixed.to_dict()
    assert result.outcome.sim_accuracy == pytest.approx(mixed.score)
    table = result.table()
    assert "mixed precision: " in table and "within the budget of 2 points" in table
    assert f"weights {mixed.size_bytes} bytes" in table
    restored = mq.restore(MLPBN(), mq.load_checkpoint(result.checkpoint))
    bits = {fq.layer: fq.scheme.bits for fq in mq.quantizers(restored, activations=False).values()}
    assert bits == {layer: int(name[1]) for layer, name in mixed.assignment.items() if layer in bits}


def test_accuracy_budget_is_a_toml_key_and_a_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.toml").write_text("accuracy_budget = -1\n")
    result = CliRunner().invoke(cli, ["quantize", "--config", "q.toml"])
    assert result.exit_code == 2 and "accuracy_budget = -1 is not valid for --accuracy-budget" in result.output
    result = CliRunner().invoke(cli, ["quantize", "--accuracy-budget", "x"])
    assert result.exit_code == 2 and "--accuracy-budget" in result.output
