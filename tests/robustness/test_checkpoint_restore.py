"""Checkpoints restore what was prepared, or say at once why not (issue 10, points 17, 19 and 12's crafted info).

* 17: ``preserved_attributes`` methods run on the prepared model, and preserved attributes survive a checkpoint.
* 19: a model prepared with a custom ``Backend`` object, or with an observer class in a ``QuantizerSpec``, restores
  (the Backend object is passed again to ``mq.restore``; the class is recorded by reference); what no restore could
  find again is refused when saving.
* 12: a malformed or crafted checkpoint (``info``, ``inputs``, ``state_dict``, ``extra``) is one clear error, exit
  status 2 on the command line, never a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.cli.quantize import DEMO_MODEL_REF
from mq_core.demo.digits import DigitsCNN
from mq_core.quant.observers.minmax import MinMaxObserver


class Classifier(nn.Module):
    """A model with a method and a data attribute that users preserve through prepare()."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        self.labels = ["cat", "dog", "fox", "owl"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).softmax(-1)


class WideMinMaxObserver(MinMaxObserver):
    """A user's own observer class, passed to a QuantizerSpec directly instead of by a registered name."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = super().calculate_qparams()
        return scale * 2, zero_point


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, generator=gen) for _ in range(2)]


def _calibrated(backend: Any = "qdq", **options: Any) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model, data = Classifier().eval(), _data()
    qmodel = mq.prepare(model, backend, (data[0],), **options)
    mq.calibrate(qmodel, data, progress=False)
    return model, qmodel, data


# --- point 17 -------------------------------------------------------------------------------------------------


def test_preserved_methods_run_on_the_prepared_model_and_survive_a_checkpoint(tmp_path: Path) -> None:
    model, qmodel, data = _calibrated(preserved_attributes=["predict", "labels"])
    x = data[0]
    with torch.no_grad():
        assert qmodel.predict.__self__ is qmodel
        assert torch.equal(qmodel.predict(x), qmodel(x).softmax(-1))
        assert not torch.equal(qmodel.predict(x), model.predict(x))  # quantized, not the float copy's output
        clone = copy.deepcopy(qmodel)
        assert clone.predict.__self__ is clone and clone.labels == model.labels
    path = mq.save_checkpoint(qmodel, tmp_path / "m.pt", x)
    checkpoint = mq.load_checkpoint(path)
    assert checkpoint["info"]["preserved_attributes"] == ["predict", "labels"]
    fresh = Classifier()
    fresh.labels = ["a", "b", "c", "d"]  # data attributes are read again from the float model given to restore
    restored = mq.restore(fresh, checkpoint)
    with torch.no_grad():
        assert restored.predict.__self__ is restored
        assert torch.equal(restored.predict(x), qmodel.predict(x))
    assert restored.labels == ["a", "b", "c", "d"]


# --- point 19 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{"name": "my-qdq"}, {"placement": "inputs-only"}],
                         ids=["other-name", "same-name-other-placement"])
def test_custom_backend_object_is_restored_when_passed_again(tmp_path: Path, changes: dict[str, Any]) -> None:
    installed = mq.get_backend("qdq")
    if changes.get("placement") == "inputs-only":
        changes = {"placement": dataclasses.replace(installed.placement, network_outputs=False)}
    custom = dataclasses.replace(installed, **changes)
    model, qmodel, data = _calibrated(custom)
    checkpoint = mq.load_checkpoint(mq.save_checkpoint(qmodel, tmp_path / "m.pt", data[0]))
    with pytest.raises(mq.ConfigError, match=f"custom Backend object named '{custom.name}'") as info:
        mq.restore(copy.deepcopy(model), checkpoint)
    assert "backend=my_backend" in str(info.value)
    restored = mq.restore(copy.deepcopy(model), checkpoint, backend=custom)
    assert sorted(mq.quantizers(restored)) == sorted(mq.quantizers(qmodel))
    with torch.no_grad():
        assert torch.equal(restored(data[1]), qmodel(data[1]))
    # the installed backend itself, passed as an object, needs nothing passed again
    _, plain, _ = _calibrated(installed)
    checkpoint = mq.load_checkpoint(mq.save_checkpoint(plain, tmp_path / "p.pt", data[0]))
    assert checkpoint["info"]["custom_backend"] is False
    with torch.no_grad():
        assert torch.equal(mq.restore(copy.deepcopy(model), checkpoint)(data[1]), plain(data[1]))


def _with_observer(observer: Any) -> mq.QConfig:
    base = mq.get_backend("qdq").qconfig
    return dataclasses.replace(base, activation=base.activation.replace(observer=observer), name="wide")


def test_observer_class_in_a_quantizer_spec_is_recorded_and_restored(tmp_path: Path) -> None:
    model, qmodel, data = _calibrated(qconfig=_with_observer(WideMinMaxObserver))
    path = mq.save_checkpoint(qmodel, tmp_path / "m.pt", data[0])
    raw = torch.load(path, weights_only=True)  # plain data: the class is recorded by reference
    assert raw["info"]["qconfig"]["activation"]["observer"] == f"{__name__}:WideMinMaxObserver"
    restored = mq.restore(copy.deepcopy(model), mq.load_checkpoint(path))
    assert all(type(fq.observer) is WideMinMaxObserver
               for fq in mq.quantizers(restored).values() if fq.role == "activation")
    with torch.no_grad():
        assert torch.equal(restored(data[1]), qmodel(data[1]))


def test_what_no_restore_could_find_again_is_refused_when_saving(tmp_path: Path) -> None:
    class LocalObserver(MinMaxObserver):
        pass

    _, qmodel, data = _calibrated(qconfig=_with_observer(LocalObserver))
    with pytest.raises(mq.ConfigError, match=r"activation observer .*LocalObserver.* cannot be found by name again"):
        mq.save_checkpoint(qmodel, tmp_path / "m.pt", data[0])
    _, qmodel, data = _calibrated(skip=[lambda x: x])
    with pytest.raises(mq.ConfigError, match=r"skip entry .*lambda.* cannot be found by name again"):
        mq.save_checkpoint(qmodel, tmp_path / "m.pt", data[0])
    _, qmodel, data = _calibrated()
    with pytest.raises(mq.ConfigError, match=r"extra\.hook holds a builtin_function_or_method"):
        mq.save_checkpoint(qmodel, tmp_path / "m.pt", data[0], extra={"hook": print})
    assert not (tmp_path / "m.pt").exists()


# --- point 12: crafted checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated digits CNN saved with the demo's (trusted) model reference, so the CLI rebuilds it unasked."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    qmodel = mq.prepare(DigitsCNN().eval(), "qdq", (x,))
    mq.calibrate(qmodel, [x], progress=False)
    return mq.save_checkpoint(qmodel, tmp_path_factory.mktemp("crafted") / "demo.pt", x, model_ref=DEMO_MODEL_REF)


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        target = payload
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


SCHEME = ("info", "qconfig", "weight", "scheme")
#: Crafted fields that loading refuses (``mq.load_checkpoint``), each with a fragment of the message.
MALFORMED = {
    "info-not-a-table": (_set("info", value=[1]), "'info' is not a table"),
    "backend-number": (_set("info", "backend", value=5), "'info.backend' is not a name"),
    "mode": (_set("info", "mode", value="train"), "'info.mode' is 'train'"),
    "exact-text": (_set("info", "exact", value="yes"), "'info.exact'"),
    "skip-text": (_set("info", "skip", value="fc"), "'info.skip' is not a list"),
    "preserved-number": (_set("info", "preserved_attributes", value=3), "'info.preserved_attributes'"),
    "qconfig-missing": (_set("info", "qconfig", value=None), "'info.qconfig' is not a qconfig"),
    "bits-text": (_set(*SCHEME, "bits", value="8"), "'info.qconfig.weight.scheme.bits' is '8', not a int"),
    "bits-64": (_set(*SCHEME, "bits", value=64), "invalid grid"),
    "observer-number": (_set("info", "qconfig", "activation", "observer", value=5), "observer' is not a name"),
    "no-inputs": (_set("inputs", value=[]), "'inputs' is not a list"),
    "negative-shape": (_set("inputs", 0, "shape", value=[-1, 1, 8, 8]), "'inputs[0]' has no valid shape"),
    "huge-shape": (_set("inputs", 0, "shape", value=[2**20, 2**20]), "more than the"),
    "dtype-function": (_set("inputs", 0, "dtype", value="load"), "dtype 'load', not a torch dtype"),
    "state-dict-list": (_set("state_dict", value=[1]), "'state_dict' is not a state dict"),
    "state-value-text": (_set("state_dict", "fc.weight_fake_quant.scale", value="x"), "is not a tensor"),
    "model-ref-number": (_set("model_ref", value=5), "'model_ref'"),
    "extra-list": (_set("extra", value=[1]), "'extra' is not a table"),
}


def _crafted(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    payload = torch.load(source, weights_only=True)
    change(payload)
    torch.save(payload, target)
    return target


def _assert_cli_error(result: Any, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message and "Traceback" not in message, result.output
    assert fragment in message, message


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_crafted_checkpoint_is_one_clear_error(demo_checkpoint: Path, tmp_path: Path, case: str) -> None:
    change, fragment = MALFORMED[case]
    path = _crafted(demo_checkpoint, tmp_path / "crafted.pt", change)
    with pytest.raises(mq.ConfigError, match="is not a valid mq checkpoint") as info:
        mq.load_checkpoint(path)
    assert fragment in str(info.value)
    for command in (["inspect", str(path)], ["export", str(path), "--out", str(tmp_path / "out")]):
        _assert_cli_error(CliRunner().invoke(cli, command), fragment)


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        (_set("info", "qconfig", "activation", "observer_options", value={"bogus": 1}), mq.ConfigError,
         "do not prepare this model"),
        (_set("info", "qconfig", "activation", "observer", value="nosuch"), mq.UnknownNameError,
         "unknown observer 'nosuch'"),
        (_set("info", "modules", value=["nosuch"]), mq.ConfigError, "'nosuch'"),
    ],
    ids=["observer-options", "unknown-observer", "unknown-sub-module"],
)
def test_settings_that_load_but_cannot_prepare_are_one_clear_error(demo_checkpoint: Path, tmp_path: Path,
                                                                   change: Callable[[dict[str, Any]], None],
                                                                   error: type[Exception], fragment: str) -> None:
    path = _crafted(demo_checkpoint, tmp_path / "crafted.pt", change)
    with pytest.raises(error, match=fragment):
        mq.restore(DigitsCNN(), mq.load_checkpoint(path))
    _assert_cli_error(CliRunner().invoke(cli, ["export", str(path), "--out", str(tmp_path / "out")]), fragment)
