"""Calibration state and calibration data (issue 10, points 9 and 11).

Point 9: ``mq.calibrate`` starts from fresh observer state unless ``accumulate=True``, and a calibration that fails
part-way leaves nothing behind that the next one would silently inherit.
Point 11: one data rule (``iter_batches``: tensor ``[N, ...]``, numpy array, Dataset, DataLoader, iterable of
batches) and one batch rule (``model_inputs``: tensor, ``(inputs..., target)``, dict), and a batch whose shape
disagrees with the example inputs is refused naming both shapes before any observer sees it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import mq_core as mq
from mq_core.pipeline.calibrate import iter_batches, model_inputs
from mq_core.quant.scheme import QuantScheme


class Net(nn.Module):
    """A conv net that runs on any image size (adaptive pooling): wrong-size data would pass through silently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(image))), 1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a + b)


def images(n: int, size: int = 12, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * scale


EXAMPLE = images(1)
SMALL = [images(4, seed=s) for s in (1, 2)]
LARGE = [images(4, seed=s, scale=20.0) for s in (3, 4)]


def prepared(model: nn.Module | None = None, example: object = EXAMPLE) -> nn.Module:
    torch.manual_seed(0)
    return mq.prepare((model or Net()).eval(), "qdq", example)


def activation_state(qmodel: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (fq.scale.clone(), fq.zero_point.clone()) for n, fq in mq.quantizers(qmodel, weights=False).items()}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    left, right = activation_state(a), activation_state(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=0, msg=name)


def assert_reset(qmodel: nn.Module) -> None:
    for name, fq in mq.quantizers(qmodel).items():
        assert not fq.is_calibrated, name
        assert not fq.observer.observed, name
        assert not fq.observe_enabled.item() and not fq.quant_enabled.item(), name


def calibrated(data: object, **kwargs: object) -> nn.Module:
    qmodel = prepared()
    mq.calibrate(qmodel, data, progress=False, **kwargs)
    return qmodel


# --- point 9: fresh state ---------------------------------------------------------------------------------------


def test_a_second_calibration_starts_fresh() -> None:
    """Regression: a second mq.calibrate kept the first one's min/max, so small data after large data still got
    the large ranges."""
    qmodel = calibrated(LARGE)
    mq.calibrate(qmodel, SMALL, progress=False)
    assert_same_state(qmodel, calibrated(SMALL))
    assert {int(fq.observer.num_batches) for fq in mq.quantizers(qmodel, weights=False).values()} == {len(SMALL)}


def test_accumulate_keeps_the_statistics_already_observed() -> None:
    qmodel = calibrated(LARGE)
    mq.calibrate(qmodel, SMALL, progress=False, accumulate=True)
    assert_same_state(qmodel, calibrated(LARGE + SMALL))


def test_a_batch_that_fails_half_way_leaves_no_ranges_behind() -> None:
    qmodel = calibrated(SMALL)
    bad = LARGE[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(mq.CalibrationError, match="saw NaN or Inf"):
        mq.calibrate(qmodel, [LARGE[1], bad], progress=False)
    assert_reset(qmodel)  # neither the earlier calibration nor LARGE[1]'s partial ranges are left
    mq.calibrate(qmodel, SMALL, progress=False, accumulate=True)  # accumulating onto nothing
    assert_same_state(qmodel, calibrated(SMALL))


def test_an_interrupt_or_a_failing_data_source_resets_every_quantizer() -> None:
    qmodel = calibrated(SMALL)

    def interrupted() -> Iterator[torch.Tensor]:
        yield SMALL[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mq.calibrate(qmodel, interrupted(), progress=False)
    assert_reset(qmodel)
    assert not qmodel.training  # the training flag is restored whatever happened

    def broken() -> Iterator[torch.Tensor]:
        yield SMALL[0]
        raise OSError("disk gone")

    with pytest.raises(mq.CalibrationError, match=r"reading calibration batch 2 failed: OSError: disk gone"):
        mq.calibrate(qmodel, broken(), progress=False)
    assert_reset(qmodel)


def test_a_forward_error_names_the_batch() -> None:
    class Fussy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).reshape(2, 4)  # only works for batches of 2

    qmodel = mq.prepare(Fussy().eval(), "qdq", torch.randn(2, 4))
    with pytest.raises(mq.CalibrationError, match=r"the model raised RuntimeError on calibration batch 2"):
        mq.calibrate(qmodel, [torch.randn(2, 4), torch.randn(3, 4)], progress=False)
    assert_reset(qmodel)


@pytest.mark.parametrize("name", mq.list_observers())
def test_observer_reset_gives_a_fresh_observer(name: str) -> None:
    """Every installed observer (core and plugins) forgets everything on reset(): afterwards it computes exactly
    what a new one computes on the same data."""
    cls = mq.get_observer(name)
    scheme = QuantScheme(8, signed=False, symmetric=False)
    gen = torch.Generator().manual_seed(0)
    used, fresh = cls(scheme), cls(scheme)
    for _ in range(2):
        used(torch.randn(64, generator=gen) * 50 - 20)
    used.reset()
    assert not used.observed
    assert {k: (v.shape, v.dtype) for k, v in used.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()}
    batch = torch.rand(64, generator=gen)
    used(batch)
    fresh(batch)
    for a, b in zip(used.calculate_qparams(), fresh.calculate_qparams(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- point 11: the data rule ------------------------------------------------------------------------------------


def test_a_tensor_is_n_samples_split_into_batches() -> None:
    data = torch.cat(SMALL + LARGE)  # [16, 1, 12, 12]
    qmodel = calibrated(data, batch_size=4)
    assert {int(fq.observer.num_batches) for fq in mq.quantizers(qmodel, weights=False).values()} == {4}
    assert_same_state(qmodel, calibrated(SMALL + LARGE))
    assert_same_state(calibrated(data.numpy(), batch_size=4), qmodel)  # a numpy array is the same
    assert [len(b) for b in iter_batches(data, batch_size=5)] == [5, 5, 5, 1]


def test_datasets_dataloaders_tuples_and_dicts_give_the_same_calibration() -> None:
    x = torch.cat(SMALL)
    y = torch.arange(len(x))
    reference = calibrated(SMALL)

    class Dicts(Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": x[i], "label": y[i]}

    for data in (
        TensorDataset(x, y),                                      # samples (input, target), batched here
        DataLoader(TensorDataset(x, y), batch_size=4),            # (input, target) batches
        [(a, b) for a, b in zip(x.split(4), y.split(4), strict=True)],
        Dicts(),                                                  # dict samples: the 'image' entry is the input
        [{"label": b, "image": a} for a, b in zip(x.split(4), y.split(4), strict=True)],
    ):
        assert_same_state(calibrated(data, batch_size=4), reference)


def test_which_element_is_the_model_input() -> None:
    two = prepared(TwoInputs(), (torch.randn(1, 8), torch.randn(1, 8)))
    a, b, target = torch.randn(3, 8), torch.randn(3, 8), torch.zeros(3)
    assert model_inputs(two, (a, b, target)) == ((a, b), {})
    args, kwargs = model_inputs(two, {"b": b, "a": a, "target": target})
    assert args == () and kwargs.keys() == {"a", "b"}
    with pytest.raises(mq.CalibrationError, match=r"the model takes 2 inputs, but the batch is a single tensor"):
        model_inputs(two, a)
    with pytest.raises(mq.CalibrationError, match=r"keys \['a', 'label'\] but no 'b'"):
        model_inputs(two, {"a": a, "label": target})
    mq.calibrate(two, [(a, b, target)], progress=False)


@pytest.mark.parametrize("bad", [None, "calib.pt", 5, {"image": EXAMPLE}, torch.tensor(1.0)])
def test_data_of_no_known_kind_is_refused(bad: object) -> None:
    qmodel = prepared()
    with pytest.raises(mq.CalibrationError, match="calibration data"):
        mq.calibrate(qmodel, bad, progress=False)


def test_only_the_batches_needed_are_read_from_a_dataset() -> None:
    reads = []

    class Endless(Dataset):
        def __len__(self) -> int:
            return 10**9

        def __getitem__(self, i: int) -> torch.Tensor:
            reads.append(i)
            return images(1, seed=i)[0]

    mq.calibrate(prepared(), Endless(), num_batches=2, batch_size=3, progress=False)
    assert reads == list(range(6))


# --- point 11: shapes -------------------------------------------------------------------------------------------


def test_wrong_image_size_is_refused_naming_both_shapes_before_any_observer_runs() -> None:
    """Regression: 28x28 data on a model prepared for 32x32 calibrated (and exported) without a word."""
    fresh = prepared(example=images(1, size=32))
    with pytest.raises(mq.CalibrationError) as info:
        mq.calibrate(fresh, [images(4, size=28)], progress=False)
    message = str(info.value)
    assert "calibration batch 1" in message and "[4, 1, 28, 28]" in message and "[1, 1, 32, 32]" in message
    assert "\n" not in message and "Traceback" not in message
    assert not any(fq.observer.observed for fq in mq.quantizers(fresh).values())

    done = prepared(example=images(1, size=32))
    mq.calibrate(done, [images(4, size=32)], progress=False)
    before = activation_state(done)
    with pytest.raises(mq.CalibrationError, match=r"\[8, 1, 28, 28\]"):
        mq.calibrate(done, images(8, size=28), progress=False)
    for name, (scale, zero_point) in activation_state(done).items():  # untouched: still calibrated and enabled
        assert torch.equal(scale, before[name][0]) and torch.equal(zero_point, before[name][1])
    assert all(fq.is_calibrated and fq.quant_enabled.item() for fq in mq.quantizers(done).values())


def test_a_wrong_batch_later_on_names_its_number_and_resets() -> None:
    qmodel = prepared()
    with pytest.raises(mq.CalibrationError, match=r"calibration batch 3: input 0 of the batch has shape \[4, 3, 12"):
        mq.calibrate(qmodel, [*SMALL, images(4).repeat(1, 3, 1, 1)], progress=False)
    assert_reset(qmodel)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (images(1)[0], r"shape \[1, 12, 12\].*one sample without its batch dimension"),
        (torch.tensor(0.5), r"shape \[\]"),
        (torch.zeros(4, 1, 12, 12, dtype=torch.long), r"is int64, but the model was prepared with .*\(float32\)"),
        (images(4).double(), r"is float64.*x\.to\(torch\.float32\)"),
        ([[1.0, 2.0]], r"input 0 of the batch is a list"),
        ("text", r"a calibration batch must be a tensor.*got a str"),
    ],
)
def test_batches_unlike_the_example_inputs(batch: object, expected: str) -> None:
    qmodel = prepared()
    with pytest.raises(mq.CalibrationError, match=expected):
        mq.calibrate(qmodel, [batch], progress=False)
    assert not any(fq.observer.observed for fq in mq.quantizers(qmodel).values())


def test_integer_inputs_may_differ_in_width() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(ids))

    qmodel = prepared(Tokens(), torch.zeros(1, 5, dtype=torch.long))
    mq.calibrate(qmodel, [torch.randint(0, 10, (3, 5), dtype=torch.int32)], progress=False)
    with pytest.raises(mq.CalibrationError, match="is float32"):
        mq.calibrate(qmodel, [torch.rand(3, 5)], progress=False)


def test_ptq_follows_the_same_rules() -> None:
    pytest.importorskip("mq_algos")
    qmodel = calibrated(SMALL)
    with pytest.raises(mq.CalibrationError, match=r"calibration batch 2: .*\[4, 1, 28, 28\].*\[1, 1, 12, 12\]"):
        mq.ptq(qmodel, "adaround", [SMALL[0], images(4, size=28)], iterations=1, progress=False)
    with pytest.raises(mq.ConfigError, match="num_batches"):
        mq.ptq(qmodel, "adaround", SMALL, num_batches=-1, iterations=1, progress=False)
    mq.ptq(qmodel, "adaround", torch.cat(SMALL), iterations=1, progress=False)  # a tensor of samples
