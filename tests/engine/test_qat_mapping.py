"""QAT modules through the registration hook: every mapped float type converts, and converts back with BN folded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_utils import deterministic
from torch import nn

import mq_core as mq
from mq_core.nn import FUSED_MODULES, LAYER_TYPES, QAT_MODULES, FusedModule, QATBnModule, QATModule
from mq_core.plugins import get_manager
from mq_core.plugins.lookup import qat_module_mapping
from mq_core.plugins.registry import Entry
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.scheme import QuantScheme


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    yield from deterministic()


#: torch layer -> (factory, BatchNorm type, input shape)
LAYERS: dict[type[nn.Module], tuple[Any, type[nn.Module], tuple[int, ...]]] = {
    nn.Conv1d: (lambda: nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d, (2, 4, 9)),
    nn.Conv2d: (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d, (2, 4, 7, 7)),
    nn.Conv3d: (lambda: nn.Conv3d(3, 4, 3, bias=False), nn.BatchNorm3d, (2, 3, 5, 5, 5)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d, (2, 4, 7)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d, (2, 4, 5, 5)),
    nn.Linear: (lambda: nn.Linear(5, 6), nn.BatchNorm1d, (8, 5)),
}


def float_module(float_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    """An instance of a plain layer or fused container type, with non-trivial BN statistics, in eval mode."""
    if not issubclass(float_type, FusedModule):
        make, _, shape = LAYERS[float_type]
        return make().eval(), torch.randn(shape)
    make, bn_type, shape = LAYERS[float_type.layer_type]
    layer = make()
    parts = [layer]
    if float_type.has_bn:
        bn = bn_type(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)
        c = bn.num_features
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(c))
            bn.running_var.copy_(torch.rand(c) + 0.3)
            bn.weight.copy_(torch.randn(c))
            bn.bias.copy_(torch.randn(c))
        parts.append(bn)
    if float_type.has_act:
        parts.append(nn.ReLU6())
    return float_type(*parts).eval(), torch.randn(shape)


def weight_quantizer(qat_type: type[QATModule]) -> FakeQuantizer:
    return mq.get_qconfig("w8a8").apply(mq.get_backend("qdq").qconfig).weight.build(ch_axis=qat_type.weight_ch_axis)


MAPPING = qat_module_mapping()


def test_the_mapping_comes_from_the_hook_and_covers_every_layer_and_fused_container() -> None:
    mapping = qat_module_mapping()
    assert set(LAYER_TYPES) <= set(mapping)
    assert set(FUSED_MODULES.values()) <= set(mapping)
    assert mapping == {**mapping, **QAT_MODULES}  # the core registers its table through the hook
    entries = get_manager().registries["qat_module"].entries()
    assert {e.distribution for e in entries if e.obj[0] in QAT_MODULES} == {"mq-core"}


@pytest.mark.parametrize("float_type", list(MAPPING), ids=lambda t: t.__name__)
def test_every_mapped_type_converts_and_converts_back(float_type: type[nn.Module]) -> None:
    qat_type = MAPPING[float_type]
    assert issubclass(qat_type, QATModule)
    if float_type not in LAYERS and not issubclass(float_type, FusedModule):
        pytest.skip(f"{float_type.__name__} comes from a plugin this suite has no factory for")
    module, x = float_module(float_type)
    layer_type = float_type.layer_type if issubclass(float_type, FusedModule) else float_type
    assert issubclass(qat_type, layer_type)  # a QConv2d is an nn.Conv2d
    has_bn = issubclass(float_type, FusedModule) and float_type.has_bn
    assert issubclass(qat_type, QATBnModule) == has_bn
    qat = qat_type.from_float(module, weight_quantizer(qat_type))
    assert isinstance(qat.weight_fake_quant, FakeQuantizer)
    assert qat.weight_fake_quant.ch_axis == qat_type.weight_ch_axis
    qat.eval()
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(qat(x), expected, atol=1e-5, rtol=1e-5)  # quantization off: float
        deploy = qat.to_float()
        layer = deploy[0] if isinstance(deploy, nn.Sequential) else deploy
        assert type(layer) is layer_type  # a plain torch layer, BN folded into it
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
        assert isinstance(deploy, nn.Sequential) == (issubclass(float_type, FusedModule) and float_type.has_act)
        torch.testing.assert_close(deploy(x), expected, atol=1e-5, rtol=1e-5)
        # with weight quantization on, the QAT module equals its deploy layer with a fake-quantized weight
        qat.weight_fake_quant.enable_observation(True)
        qat(x)
        qat.weight_fake_quant.enable_observation(False)
        qat.weight_fake_quant.enable_quantization(True)
        with torch.no_grad():
            layer.weight.copy_(qat.weight_fake_quant(layer.weight))
        torch.testing.assert_close(qat(x), deploy(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(qat(x), expected, atol=1e-6)


# --- a plugin's mapping drives prepare() ------------------------------------------------------------------------------
class Scaled(nn.Module):
    """A third-party layer: y = (x @ W^T) * gain."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) * 0.3)
        self.gain = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * self.gain


class QScaled(nn.Module):
    """Its QAT module, in the shape prepare() expects: from_float, weight_ch_axis, deploy_weight_and_bias."""

    weight_ch_axis = 0
    mq_leaf = True

    def __init__(self, weight: torch.Tensor, gain: float, weight_fake_quant: FakeQuantizer) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.gain = gain
        self.weight_fake_quant = weight_fake_quant

    @classmethod
    def from_float(cls, mod: Scaled, weight_fake_quant: FakeQuantizer) -> QScaled:
        return cls(mod.weight, mod.gain, weight_fake_quant)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, None]:
        return self.weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fake_quant(self.weight)) * self.gain


def test_a_registered_mapping_is_used_by_prepare() -> None:
    registry = get_manager().registries["qat_module"]
    registry.add(Entry("qat_module", "tests.Scaled", (Scaled, QScaled), distribution="mq-test-plugin"))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Scaled(6, 3)).eval()
    x = torch.randn(8, 4)
    q = mq.prepare(model, "qdq", (x,), leaf_modules=[Scaled])
    scaled = q.get_submodule("2")
    assert type(scaled) is QScaled
    assert scaled.weight_fake_quant.role == "weight" and scaled.weight_fake_quant.qname == "2.weight_fake_quant"
    assert scaled.weight_fake_quant.scheme.per_channel and scaled.weight_fake_quant.ch_axis == 0
    assert "2.weight_fake_quant" in mq.quantizers(q, activations=False)
    mq.calibrate(q, [x], progress=False)
    expected = scaled.weight.detach().abs().amax(dim=1) / 127
    torch.testing.assert_close(scaled.weight_fake_quant.scale, expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert ((q(x) - model(x)).abs().max() / model(x).abs().max()).item() < 0.05


def test_qat_layers_refuse_a_per_channel_axis_that_is_not_the_output_channels() -> None:
    scheme = QuantScheme(8, per_channel=True, ch_axis=1)
    fq = FakeQuantizer(scheme)
    with pytest.raises(mq.SchemeError, match="axis 0"):
        MAPPING[nn.Conv2d].from_float(nn.Conv2d(2, 4, 1), fq)
    with pytest.raises(mq.SchemeError, match="axis 1"):
        MAPPING[nn.ConvTranspose2d].from_float(nn.ConvTranspose2d(2, 4, 1), FakeQuantizer(scheme.replace(ch_axis=0)))
