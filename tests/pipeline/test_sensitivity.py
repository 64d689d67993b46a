"""Issue 15, item 1: ``mq.sensitivity`` - per quantizer its tensor's SQNR, range statistics and end-to-end effect,
most sensitive first; checked against numbers computed here by hand on the digits demo and on ResNet-18."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import mq_core as mq
from mq_core.demo import digits
from mq_core.testing.zoo import resnet18

pytestmark = pytest.mark.usefixtures("deterministic")

QUANTIZER_KEYS = {"name", "role", "layer", "bits", "sqnr_db", "only_quantized", "only_float", "min", "max", "clip_lo",
                  "clip_hi", "clipped_fraction", "hist_counts", "hist_edges"}


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits()


@pytest.fixture(scope="module")
def calibrated(data: digits.DigitsData) -> torch.nn.Module:
    torch.manual_seed(0)
    qmodel = mq.prepare(digits.pretrained("cnn"), mq.get_backend("qdq"), example_inputs=(data.x_test[:4],))
    return mq.calibrate(qmodel, data.calibration_batches(4), progress=False)


@pytest.fixture
def qmodel(calibrated: torch.nn.Module) -> torch.nn.Module:
    """A copy each test may spoil."""
    return copy.deepcopy(calibrated)


def accuracy_on(data: digits.DigitsData):
    return lambda model: digits.accuracy(model, data.x_test[:200], data.y_test[:200])


def switches(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (int(fq.observe_enabled), int(fq.quant_enabled)) for n, fq in mq.quantizers(model).items()}


def test_report_follows_the_shared_schema_and_leaves_the_model_as_it_was(qmodel, data) -> None:
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    qmodel.train()
    report = mq.sensitivity(qmodel, data.x_test[:96], batch_size=32, bins=16)
    assert qmodel.training and all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert set(as_dict) == {"metric", "baseline", "quantizers", "ranking"} and as_dict["metric"] == "sqnr_db"
    assert as_dict["baseline"]["float"] is None and 25 < as_dict["baseline"]["quantized"] < 60
    rows = {q["name"]: q for q in as_dict["quantizers"]}
    assert sorted(as_dict["ranking"]) == sorted(rows) == sorted(mq.quantizers(qmodel))
    for q in rows.values():
        assert set(q) == QUANTIZER_KEYS and q["bits"] == 8 and q["role"] in ("weight", "activation")
        assert len(q["hist_counts"]) == 16 and len(q["hist_edges"]) == 17
        assert q["hist_edges"][0] == min(q["min"], q["clip_lo"]) and q["hist_edges"][-1] == max(q["max"], q["clip_hi"])
        # the quantized model is at least as far from float as any one quantizer alone
        assert q["only_quantized"] >= as_dict["baseline"]["quantized"] - 1e-6
    # a weight is counted once, an activation over every element of every batch
    assert sum(rows["features.3.weight_fake_quant"]["hist_counts"]) == qmodel.get_submodule("features.3").weight.numel()
    assert sum(rows["x_fq"]["hist_counts"]) == 96 * 64
    assert rows["features.3.weight_fake_quant"]["layer"] == rows["features_3_fq"]["layer"] == "features.3"
    # ranked by the drop with only this quantizer on
    only = [rows[n]["only_quantized"] for n in as_dict["ranking"]]
    assert only == sorted(only)
    lines = report.table(limit=3).splitlines()
    assert len(lines) == 6 and lines[3].split()[1] == as_dict["ranking"][0] and "first 3 of 10" in lines[0]


def test_weight_sqnr_matches_a_hand_computation(qmodel, data) -> None:
    report = mq.sensitivity(qmodel, data.x_test[:32], sweep=False).by_name()
    weight = qmodel.get_submodule("features.3").weight.detach().double()  # BN folded at prepare: the deploy weight
    scale = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127  # int8 symmetric per output channel
    quantized = torch.clamp(torch.round(weight / scale), -128, 127) * scale
    expected = 10 * math.log10(float((weight ** 2).sum() / ((quantized - weight) ** 2).sum()))
    row = report["features.3.weight_fake_quant"]
    assert row.sqnr_db == pytest.approx(expected, abs=0.05) and 35 < row.sqnr_db < 55  # ~6 dB per bit
    assert row.min == pytest.approx(float(weight.min())) and row.max == pytest.approx(float(weight.max()))
    assert row.clipped_fraction == 0.0 and row.only_quantized is None and row.only_float is None


def test_clipped_fraction_and_range_match_a_hand_count(qmodel, data) -> None:
    fq = qmodel.x_fq  # quantizes the network input itself: its float tensor is the data
    fq.scale.mul_(0.5)  # now clips the brighter half of the pixel range
    x = data.x_test[:64]
    row = mq.sensitivity(qmodel, x, sweep=False, bins=8).by_name()["x_fq"]
    s, z = float(fq.scale), int(fq.zero_point)
    lo, hi = (0 - z) * s, (255 - z) * s
    assert (row.clip_lo, row.clip_hi) == pytest.approx((lo, hi))
    hand_count = int(((x < lo) | (x > hi)).sum())
    assert row.clipped_fraction == hand_count / x.numel() and hand_count > 0.1 * x.numel()
    assert (row.min, row.max) == (float(x.min()), float(x.max()))
    assert row.hist_counts == torch.histc(x.double(), 8, row.hist_edges[0], row.hist_edges[-1]).long().tolist()


def test_a_deliberately_bad_quantizer_ranks_first(qmodel, data) -> None:
    bad = qmodel.features_3_fq
    bad.scale.mul_(0.25)  # clips three quarters of its range away
    report = mq.sensitivity(qmodel, data.x_test[:64])
    assert report.ranking[0] == "features_3_fq" and report.by_name()["features_3_fq"].clipped_fraction > 0.01
    weight = qmodel.get_submodule("features.7").weight_fake_quant
    weight.scale.mul_(0.2)
    by_eval = mq.sensitivity(qmodel, data.x_test[:32], eval_fn=accuracy_on(data))
    assert by_eval.metric == "eval" and by_eval.ranking[:2] == ["features.7.weight_fake_quant", "features_3_fq"]


def test_sweep_with_eval_fn_equals_switches_set_by_hand(qmodel, data) -> None:
    qmodel.features_7_fq.scale.mul_(0.1)
    evaluate = accuracy_on(data)
    before = switches(qmodel)
    report = mq.sensitivity(qmodel, data.x_test[:32], eval_fn=evaluate)
    assert switches(qmodel) == before
    found = mq.quantizers(qmodel)

    def by_hand(on: set[str]) -> float:
        for name, fq in found.items():
            fq.enable_quantization(name in on)
        return evaluate(qmodel)

    row = report.by_name()["features_7_fq"]
    assert row.only_quantized == by_hand({"features_7_fq"})
    assert row.only_float == by_hand(set(found) - {"features_7_fq"})
    assert report.baseline_float == by_hand(set()) and report.baseline_quantized == by_hand(set(found))
    assert row.only_quantized < report.baseline_float


def test_switches_come_back_when_eval_fn_raises(qmodel, data) -> None:
    calls = []

    def flaky(model: torch.nn.Module) -> float:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("evaluation server went away")
        return 1.0

    qmodel.fc_fq.enable_quantization(False)  # a quantizer kept in float is left alone (and not analysed)
    before = switches(qmodel)
    with pytest.raises(RuntimeError, match="went away"):
        mq.sensitivity(qmodel, data.x_test[:32], eval_fn=flaky)
    assert switches(qmodel) == before
    assert "fc_fq" not in mq.sensitivity(qmodel, data.x_test[:32], sweep=False).ranking


def test_bad_input_is_one_clear_error(data) -> None:
    fresh = mq.prepare(digits.pretrained("cnn"), mq.get_backend("qdq"), example_inputs=(data.x_test[:4],))
    with pytest.raises(mq.CalibrationError, match=r"mq\.calibrate"):
        mq.sensitivity(fresh, data.x_test[:8])
    mq.calibrate(fresh, data.calibration_batches(1), progress=False)
    with pytest.raises(mq.ConfigError, match="bins"):
        mq.sensitivity(fresh, data.x_test[:8], bins=0)
    with pytest.raises(mq.CalibrationError, match="no batch"):
        mq.sensitivity(fresh, [])
    with pytest.raises(mq.CalibrationError, match="shape"):
        mq.sensitivity(fresh, torch.randn(4, 3, 8, 8))
    with pytest.raises(mq.ConfigError, match="finite"):
        mq.sensitivity(fresh, data.x_test[:8], eval_fn=lambda m: float("nan"))

    class Classes(torch.nn.Module):  # outputs class indices only: no output SQNR, an eval_fn is needed
        def __init__(self) -> None:
            super().__init__()
            self.net = digits.pretrained("cnn")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).argmax(1)

    classes = mq.prepare(Classes(), mq.get_backend("qdq"), example_inputs=(data.x_test[:4],))
    mq.calibrate(classes, data.calibration_batches(1), progress=False)
    with pytest.raises(mq.ConfigError, match="eval_fn"):
        mq.sensitivity(classes, data.x_test[:8])
    def agreement(model: torch.nn.Module) -> float:
        return float((model(data.x_test[:50]) == data.y_test[:50]).float().mean())

    assert mq.sensitivity(classes, data.x_test[:8], eval_fn=agreement, sweep=False).baseline_float > 0.9


def test_resnet18_a_4bit_layer_ranks_first() -> None:
    model = resnet18(size=32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    qmodel = mq.calibrate(mq.prepare(model, mq.get_backend("tensorrt"), example_inputs=(x[:1],)), [x], progress=False)
    fq = mq.quantizers(qmodel)["layers.3.conv1.weight_fake_quant"]
    weight = qmodel.get_submodule("layers.3.conv1").deploy_weight_and_bias()[0].detach()
    fq.scheme = fq.scheme.replace(bits=4)
    fq.set_qparams(weight.abs().amax(dim=(1, 2, 3)) / fq.scheme.qmax, torch.zeros(weight.shape[0]))
    report = mq.sensitivity(qmodel, [x[:1]])
    rows = report.by_name()
    assert report.ranking[0] == "layers.3.conv1.weight_fake_quant" and rows[report.ranking[0]].bits == 4
    assert len(report.ranking) == len(mq.quantizers(qmodel)) > 40
    assert rows[report.ranking[0]].sqnr_db < min(r.sqnr_db for r in rows.values() if r.bits == 8 and
                                                 r.role == "weight")
