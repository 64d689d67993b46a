"""The calibration API: switches per weights/activations, calibrate() over data, and its errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import rel_err
from torch import nn

import mq_core as mq
from mq_core.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("deterministic")


def small() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
DATA = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def prepared(backend: str = "tensorrt") -> nn.Module:
    return mq.prepare(small(), backend, (X,))


def flags(qmodel: nn.Module, weights: bool) -> set[tuple[bool, bool]]:
    """{(observe, quantize)} over the weight or the activation quantizers."""
    return {(bool(fq.observe_enabled), bool(fq.quant_enabled))
            for fq in mq.quantizers(qmodel, weights=weights, activations=not weights).values()}


def test_quantizers_lists_weights_and_activations_by_name() -> None:
    q = prepared()
    weights = mq.quantizers(q, activations=False)
    acts = mq.quantizers(q, weights=False)
    assert set(weights) == {"0.weight_fake_quant", "4.weight_fake_quant"}
    assert set(acts) == {"input_1_fq", "_3_fq"}
    assert mq.quantizers(q) == {**weights, **acts}
    assert all(fq.role == "weight" for fq in weights.values()) and all(fq.role == "activation" for fq in acts.values())
    assert all(fq.qname == name for name, fq in mq.quantizers(q).items())


@pytest.mark.parametrize(("weights", "activations"), [(True, True), (True, False), (False, True)])
def test_switches_apply_to_the_selected_group_only(weights: bool, activations: bool) -> None:
    q = prepared()
    assert flags(q, True) == flags(q, False) == {(False, False)}
    mq.enable_calibration(q, weights=weights, activations=activations)
    assert flags(q, True) == {(weights, False)}
    assert flags(q, False) == {(activations, False)}
    for batch in DATA:
        q(batch)
    mq.enable_quantization(q, weights=weights, activations=activations)
    assert flags(q, True) == {(False, weights)}
    assert flags(q, False) == {(False, activations)}
    mq.disable_all(q, weights=weights, activations=activations)
    assert flags(q, True) == flags(q, False) == {(False, False)}


def test_disable_all_gives_the_float_model_back() -> None:
    model = small()
    q = mq.prepare(model, "snpe", (X,))
    mq.calibrate(q, DATA, progress=False)
    with torch.no_grad():
        assert not torch.allclose(q(X), model(X), atol=1e-6)
        mq.disable_all(q)
        torch.testing.assert_close(q(X), model(X), atol=1e-5, rtol=1e-5)
        mq.enable_quantization(q, weights=True, activations=False)  # weights only
        weights_only = q(X)
        assert not torch.allclose(weights_only, model(X), atol=1e-6)
        mq.disable_all(q, weights=True, activations=False)
        mq.enable_quantization(q, weights=False, activations=True)  # activations only
        assert not torch.allclose(q(X), weights_only, atol=1e-6)


def test_weight_quantizers_self_calibrate_from_their_weights() -> None:
    """Regression: enable_quantization() without a prior calibration left the weight quantizers uncalibrated (their
    observer saw the weight, but qparams were only computed when observation had been switched on)."""
    q = prepared("tensorrt")
    mq.enable_quantization(q, weights=True, activations=False)
    conv, fc = q.get_submodule("0"), q.get_submodule("4")
    for layer in (conv, fc):
        fq = layer.weight_fake_quant
        assert fq.is_calibrated and bool(fq.quant_enabled)
        deploy_weight = layer.deploy_weight_and_bias()[0].detach()  # the BN-folded weight
        expected = deploy_weight.flatten(1).abs().amax(dim=1) / 127  # TensorRT: per channel, narrow, amax / 127
        torch.testing.assert_close(fq.scale, expected, rtol=1e-6, atol=0)
    assert not any(fq.is_calibrated for fq in mq.quantizers(q, weights=False).values())
    with torch.no_grad():
        y = q(X)  # activations off: runs with quantized weights only
    assert torch.isfinite(y).all()


def test_calibrate_enables_quantization_and_is_close_to_float() -> None:
    model = small()
    q = mq.prepare(model, "qdq", (X,))
    out = mq.calibrate(q, DATA, progress=False)
    assert out is q
    assert flags(q, True) == flags(q, False) == {(False, True)}
    assert all(fq.is_calibrated for fq in mq.quantizers(q).values())
    with torch.no_grad():
        assert rel_err(q(DATA[0]), model(DATA[0])) < 0.05


def test_calibrate_accepts_dataloader_style_batches_and_keeps_the_training_flag() -> None:
    q = prepared()
    q.train()
    batches = [(x, torch.zeros(4, dtype=torch.long)) for x in DATA] + [[DATA[0], None]]
    mq.calibrate(q, batches, progress=False)
    assert q.training
    assert all(int(fq.observer.num_batches) == len(batches) for fq in mq.quantizers(q, weights=False).values())
    q2 = prepared()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(DATA)), batch_size=4)
    mq.calibrate(q2, loader, progress=False)
    assert all(int(fq.observer.num_batches) == 3 for fq in mq.quantizers(q2, weights=False).values())


def test_num_batches_limits_the_data_read() -> None:
    pulled = []

    def stream() -> Iterator[torch.Tensor]:
        for i, batch in enumerate(DATA * 10):
            pulled.append(i)
            yield batch

    q = prepared()
    mq.calibrate(q, stream(), num_batches=2, progress=False)
    assert pulled == [0, 1]
    assert {int(fq.observer.num_batches) for fq in mq.quantizers(q, weights=False).values()} == {2}


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    mq.calibrate(prepared(), DATA, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    mq.calibrate(prepared(), DATA, progress=True)
    err = capsys.readouterr().err
    assert "calibrate" in err and "/3" in err  # tqdm with the known total


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_raises_naming_the_quantizer(bad: float) -> None:
    q = prepared("snpe")
    batch = X.clone()
    batch[0, 0, 0, 0] = bad
    with pytest.raises(mq.CalibrationError, match=r"quantizer input_1_fq saw NaN or Inf"):
        mq.calibrate(q, [DATA[0], batch], progress=False)


def test_non_finite_values_produced_inside_the_model_name_that_quantizer() -> None:
    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(self.conv(x) * 1000.0)

    q = mq.prepare(Overflow().eval(), "qdq", (X,))
    with pytest.raises(mq.CalibrationError, match=r"quantizer exp_fq saw NaN or Inf"):
        mq.calibrate(q, [X], progress=False)


def test_empty_data_raises() -> None:
    q = prepared()
    with pytest.raises(mq.CalibrationError, match="empty"):
        mq.calibrate(q, [], progress=False)
    with pytest.raises(mq.CalibrationError, match="empty"):
        mq.calibrate(q, iter(()), progress=False)
    with pytest.raises(mq.ConfigError, match="num_batches must be a positive integer"):
        mq.calibrate(q, DATA, num_batches=0, progress=False)
    assert flags(q, True) == flags(q, False) == {(False, False)}  # left switched off, not half-enabled


def test_bad_batch_type_raises() -> None:
    with pytest.raises(mq.CalibrationError, match="str"):
        mq.calibrate(prepared(), ["not a tensor"], progress=False)


def test_enable_quantization_lists_uncalibrated_activation_quantizers() -> None:
    q = prepared()
    with pytest.raises(mq.CalibrationError) as info:
        mq.enable_quantization(q)
    message = str(info.value)
    assert "2 quantizer(s) were never calibrated: input_1_fq, _3_fq" in message
    assert "weight_fake_quant" not in message  # weights calibrate themselves
    assert "mq.calibrate" in message
    assert not any(bool(fq.quant_enabled) for fq in mq.quantizers(q).values())


def test_a_quantizer_the_data_never_reaches_is_reported() -> None:
    q = mq.prepare(nn.Sequential(nn.Conv2d(3, 3, 1)).eval(), "qdq", (X,))
    mq.enable_calibration(q)
    mq.quantizers(q, weights=False)["input_1_fq"](X)  # only the input quantizer ever sees data
    with pytest.raises(mq.CalibrationError, match=r"1 quantizer\(s\) were never calibrated: _0_fq\. Run"):
        mq.enable_quantization(q)


@pytest.mark.parametrize("name", list(ZOO))
def test_recalibration_after_disable_all(name: str) -> None:
    z = ZOO[name]
    model, data = z.build(), z.calibration_data(2, 4)
    q = mq.prepare(model, "qdq", (data[0],))
    mq.calibrate(q, data, progress=False)
    scales = {n: fq.scale.clone() for n, fq in mq.quantizers(q).items()}
    mq.disable_all(q)
    mq.enable_quantization(q)  # qparams are kept: no new calibration needed
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in mq.quantizers(q).items())
