"""Python API arguments (issue 10, point 13, and point 12's misspelled --skip / --leaf-module names).

A wrong argument raises an ``mq.MQError`` subclass whose one-paragraph message says what to pass instead, never a
raw AttributeError/TypeError from deep inside; a layer name the model does not have is an error naming the closest
ones, instead of being ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import mq_core as mq

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def message_of(error: type[Exception], call: Callable[[], Any]) -> str:
    with pytest.raises(error) as info:
        call()
    text = str(info.value)
    assert isinstance(info.value, mq.MQError) and "\n" not in text
    return text


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"backend": None}, r"backend must be a backend name \(see `mq backends`\) or a Backend, got None"),
        ({"backend": 5}, r"backend must be .* got 5"),
        ({"qconfig": 5}, r"qconfig must be None \(the backend's default\), a preset name such as 'w4a4'.* got 5"),
        ({"model": "resnet"}, r"prepare\(\) needs an nn.Module, got str"),
        ({"example_inputs": None},
         r"example_inputs must be a tensor, a tuple of tensors or a dict of named tensors, got NoneType"),
        ({"mode": "int8"}, r"mode must be one of \('ptq', 'qat'\)"),
        ({"exact": "no"}, r"exact must be True or False, got 'no'"),
        ({"inplace": 1}, r"inplace must be True or False"),
        ({"concrete_args": ["x"]}, r"concrete_args must be a dict"),
        ({"skip": 5}, r"skip must be a list of module names, module types or functions, got int"),
        ({"skip": [3.5]}, r"skip must be a list of .*; 3.5 is of type float"),
        ({"skip": [nn.Linear(4, 2)]}, r"Linear\(.*\) is of type Linear \(pass its name"),
        ({"leaf_modules": [torch.relu]}, r"leaf_modules must be a list of module names or module types"),
        ({"modules": [1]}, r"modules must be a list of sub-module names"),
    ],
)
def test_prepare_refuses_wrong_argument_types(kwargs: dict[str, Any], expected: str) -> None:
    arguments = {"model": net(), "backend": "qdq", "example_inputs": X, **kwargs}
    message = message_of(mq.ConfigError, lambda: mq.prepare(**arguments))
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    ("option", "name", "near"),
    [
        ("skip", "fcc", "'fc'"),
        ("skip", "layer1.conv2", "'layer1.conv'"),
        ("leaf_modules", "layr1", "'layer1'"),
        ("modules", "layer_1", "'layer1'"),
    ],
)
def test_misspelled_layer_names_are_errors_with_near_matches(option: str, name: str, near: str) -> None:
    """Regression: skip=["fcc"] and leaf_modules=["layr1"] were ignored without a word (modules=["layer_1"] did
    fail, without suggestions)."""
    message = message_of(mq.ConfigError, lambda: mq.prepare(net(), "qdq", X, **{option: [name]}))
    assert f"{option}: the model has no module or layer named {name!r}; did you mean {near}" in message


def test_names_relative_to_a_quantized_sub_module() -> None:
    q = mq.prepare(net(), "qdq", X, modules=["layer1"], skip=["conv"])
    assert "layer1.conv.weight_fake_quant" not in mq.quantizers(q)
    message = message_of(mq.ConfigError, lambda: mq.prepare(net(), "qdq", X, modules=["layer1"], skip=["layer1.conv"]))
    assert "the quantized sub-module(s) layer1 (names relative to them)" in message and "did you mean 'conv'" in message


def test_valid_names_still_work_and_a_single_name_is_a_list_of_one() -> None:
    q = mq.prepare(net(), "qdq", X, skip="fc", leaf_modules="layer1")
    assert "fc.weight_fake_quant" not in mq.quantizers(q) and "stem.weight_fake_quant" in mq.quantizers(q)
    assert "layer1.conv.weight_fake_quant" not in mq.quantizers(q)  # a leaf stays float
    assert mq.prepare_info(q).skip == ["fc"] and mq.prepare_info(q).leaf_modules == ["layer1"]
    q = mq.prepare(net(), "qdq", X, skip=["add", nn.Linear, torch.flatten])  # an fx node name, a type, a function
    assert "fc.weight_fake_quant" not in mq.quantizers(q)


@pytest.fixture(scope="module")
def qmodel() -> nn.Module:
    return mq.prepare(net(), "qdq", X)


@pytest.mark.parametrize(
    ("call", "error", "expected"),
    [
        (lambda q: mq.calibrate(q, None), mq.CalibrationError, r"calibration data must be a tensor \[N, \.\.\.\], "
                                                               r"a torch Dataset, a DataLoader .* got None"),
        (lambda q: mq.calibrate(q, [X], num_batches=-1), mq.ConfigError,
         r"num_batches must be a positive integer or None \(all\), got -1"),
        (lambda q: mq.calibrate(q, [X], num_batches=True), mq.ConfigError, r"num_batches must be .* got True"),
        (lambda q: mq.calibrate(q, X, batch_size=0), mq.ConfigError, r"batch_size must be a positive integer, got 0"),
        (lambda q: mq.calibrate(q, [X], accumulate="yes"), mq.ConfigError, r"accumulate must be True or False"),
        (lambda q: mq.calibrate(5, [X]), mq.ConfigError, r"calibrate\(\) needs the prepared model .* got int"),
        (lambda q: mq.calibrate(net(), [X]), mq.ConfigError,
         r"this model was not prepared by mq; call mq.prepare\(model, backend, example_inputs\) first"),
    ],
)
def test_calibrate_refuses_wrong_arguments(qmodel: nn.Module, call: Callable[[nn.Module], Any],
                                           error: type[Exception], expected: str) -> None:
    message = message_of(error, lambda: call(qmodel))
    assert re.search(expected, message), message
    assert not any(fq.observer.observed for fq in mq.quantizers(qmodel).values())  # nothing ran
