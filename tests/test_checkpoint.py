"""Checkpoints of prepared models: state dicts, deepcopy, weights_only loading, save/load/restore."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mq_core as mq
from mq_core.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("deterministic")


def calibrated(name: str, backend: str, **options: object) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    z = ZOO[name]
    model, data = z.build(), z.calibration_data(2, 4)
    q = mq.prepare(model, backend, (data[0],), **options)
    mq.calibrate(q, data, progress=False)
    return model, q, data


def roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


CASES = [("resnet", "tensorrt", "ptq"), ("mobilenet", "snpe", "ptq"), ("unet", "openvino", "ptq"),
         ("attention", "qdq", "ptq"), ("mlp_bn", "tvm", "qat"), ("resnet", "qdq", "qat")]


@pytest.mark.parametrize(("name", "backend", "mode"), CASES)
def test_state_dict_into_a_fresh_prepare_gives_identical_outputs(name: str, backend: str, mode: str) -> None:
    model, q, data = calibrated(name, backend, mode=mode)
    q.eval()
    state = roundtrip(q.state_dict())  # survives torch.save / torch.load(weights_only=True)
    fresh = mq.prepare(copy.deepcopy(model), backend, (data[0],), mode=mode).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(data[0]), q(data[0]))  # uncalibrated: a different model before loading
    fresh.load_state_dict(state)
    assert all(fq.is_calibrated and bool(fq.quant_enabled) for fq in mq.quantizers(fresh).values())
    with torch.no_grad():
        for x in data:
            assert torch.equal(fresh(x), q(x))


def test_per_channel_qparams_and_observer_state_resize_on_load() -> None:
    model, q, data = calibrated("resnet", "tensorrt")
    fresh = mq.prepare(model, "tensorrt", (data[0],))
    fq_name = "fc.weight_fake_quant"
    assert fresh.get_submodule(fq_name).scale.shape == ()  # not calibrated yet: per-tensor placeholder
    fresh.load_state_dict(q.state_dict())
    assert fresh.get_submodule(fq_name).scale.shape == (10,)
    torch.testing.assert_close(fresh.get_submodule(fq_name).observer.max_val, q.get_submodule(fq_name).observer.max_val)
    # calibration continues from the restored observer state, exactly as on the original
    mq.enable_calibration(fresh)
    mq.enable_calibration(q)
    with torch.no_grad():
        fresh(data[1] * 3)
        q(data[1] * 3)
    mq.enable_quantization(fresh)
    mq.enable_quantization(q)
    assert all(torch.equal(a.scale, b.scale) for a, b in zip(mq.quantizers(fresh).values(), mq.quantizers(q).values()))


@pytest.mark.parametrize(("name", "backend", "mode"), CASES[:3] + CASES[-1:])
def test_deepcopy_gives_identical_outputs(name: str, backend: str, mode: str) -> None:
    _, q, data = calibrated(name, backend, mode=mode)
    q.eval()
    clone = copy.deepcopy(q)
    # regression: GraphModule.__deepcopy__ dropped mq_info, so a copy could not be checkpointed or exported
    assert mq.prepare_info(clone).to_dict() == q.mq_info.to_dict()
    assert clone.mq_info.placements == q.mq_info.placements and clone.mq_info is not q.mq_info
    with torch.no_grad():
        assert torch.equal(clone(data[0]), q(data[0]))
    # independent: changing the copy leaves the original alone
    next(iter(mq.quantizers(clone).values())).scale.mul_(2)
    with torch.no_grad():
        assert not torch.equal(clone(data[0]), q(data[0]))


def test_state_dict_holds_only_tensors() -> None:
    _, q, _ = calibrated("mobilenet", "qdq")
    state = q.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert not any(".bn." in k or "running_mean" in k for k in state)  # PTQ: folded, no BN state left behind


@pytest.mark.parametrize(("name", "backend", "mode"), CASES)
def test_save_load_restore_round_trip(tmp_path: Path, name: str, backend: str, mode: str) -> None:
    model, q, data = calibrated(name, backend, mode=mode)
    path = mq.save_checkpoint(q, tmp_path / "sub" / "model.mqpt", (data[0],), extra={"epoch": 3})
    assert path.is_file()
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled classes
    assert raw["info"]["backend"] == backend and raw["extra"] == {"epoch": 3}
    checkpoint = mq.load_checkpoint(path)
    restored = mq.restore(copy.deepcopy(model), checkpoint)
    assert restored.training == q.training
    q.eval()
    restored.eval()
    with torch.no_grad():
        for x in data:
            assert torch.equal(restored(x), q(x))


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.backbone(x), 1).flatten(1))


@pytest.mark.parametrize(
    "options",
    [
        {"modules": ["backbone"]},
        {"skip": ["head"]},
        {"skip": [nn.Linear, F.adaptive_avg_pool2d]},
        {"leaf_modules": [nn.Sequential]},
        {"exact": False},
        {"qconfig": "w4a8"},
    ],
    ids=["modules", "skip-name", "skip-type-and-function", "leaf-type", "fast-rounding", "preset"],
)
def test_restore_reproduces_prepare_options(tmp_path: Path, options: dict[str, object]) -> None:
    """Regression (skip/leaf types and functions): they were recorded by bare __qualname__ ("Linear"), which
    restore() then treated as a module name, so the restored model was prepared differently and failed to load."""
    torch.manual_seed(0)
    model = WithHead().eval()
    x = torch.randn(4, 3, 8, 8)
    q = mq.prepare(model, "qdq", (x,), **options)
    mq.calibrate(q, [x, x * 0.5], progress=False)
    path = mq.save_checkpoint(q, tmp_path / "m.pt", x)
    restored = mq.restore(copy.deepcopy(model), mq.load_checkpoint(path))
    assert sorted(mq.quantizers(restored)) == sorted(mq.quantizers(q))
    assert [type(m).__name__ for m in restored.modules()] == [type(m).__name__ for m in q.modules()]
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))


def test_restore_with_an_override(tmp_path: Path) -> None:
    model, q, data = calibrated("resnet", "qdq", skip=["fc"])
    path = mq.save_checkpoint(q, tmp_path / "m.pt", data[0])
    with pytest.raises(mq.ConfigError, match="does not match"):
        mq.restore(copy.deepcopy(model), mq.load_checkpoint(path), skip=[])


def test_wrong_architecture_is_a_clear_config_error(tmp_path: Path) -> None:
    _, q, data = calibrated("resnet", "tensorrt")
    path = mq.save_checkpoint(q, tmp_path / "resnet.pt", data[0])
    wider = type(ZOO["resnet"].build())(width=12).eval()  # same class, different shapes
    with pytest.raises(mq.ConfigError, match="does not match the model prepared from it") as info:
        mq.restore(wider, mq.load_checkpoint(path))
    assert "same float model architecture" in str(info.value)
    with pytest.raises(mq.ConfigError, match="does not match"):
        mq.restore(ZOO["mobilenet"].build(), mq.load_checkpoint(path))


def test_loading_something_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(mq.ConfigError, match="does not exist"):
        mq.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(mq.ConfigError, match="not an mq checkpoint"):
        mq.load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file")
    with pytest.raises(mq.ConfigError, match="not a readable mq checkpoint"):
        mq.load_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(mq.ConfigError, match="not prepared by mq"):
        mq.save_checkpoint(ZOO["mlp_bn"].build(), tmp_path / "x.pt", torch.randn(2, 16))
