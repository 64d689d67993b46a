"""The QAT swap: the float -> QAT module mapping comes from the registration hook, and prepare() uses a plugin's.

The round trip of each QAT module (float -> QAT -> float) is tested in tests/nn/test_qat_modules.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import mq_core as mq
from mq_core.graph.placement import Skip
from mq_core.graph.qat_swap import swap_qat_modules
from mq_core.nn import FUSED_MODULES, LAYER_TYPES, QAT_MODULES
from mq_core.plugins import get_manager
from mq_core.plugins.lookup import qat_module_mapping
from mq_core.plugins.registry import Entry
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.scheme import QuantScheme

pytestmark = pytest.mark.usefixtures("deterministic")


def test_the_mapping_comes_from_the_hook_and_covers_every_layer_and_fused_container() -> None:
    mapping = qat_module_mapping()
    assert set(LAYER_TYPES) <= set(mapping)
    assert set(FUSED_MODULES.values()) <= set(mapping)
    assert mapping == {**mapping, **QAT_MODULES}  # the core registers its table through the hook
    entries = get_manager().registries["qat_module"].entries()
    assert {e.distribution for e in entries if e.obj[0] in QAT_MODULES} == {"mq-core"}


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


def test_swap_qat_modules_uses_the_mapping_and_quantizer_factory_it_is_given() -> None:
    """The graph step looks nothing up: the caller passes the mapping and builds the weight quantizers."""
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.ConvTranspose1d(6, 2, 1), nn.Linear(1, 3)))
    axes: list[int] = []

    def build(ch_axis: int, node: fx.Node) -> FakeQuantizer:
        axes.append(ch_axis)
        return FakeQuantizer(QuantScheme(8, per_channel=True, ch_axis=ch_axis))

    mapping = {nn.Linear: QAT_MODULES[nn.Linear], nn.ConvTranspose1d: QAT_MODULES[nn.ConvTranspose1d]}
    assert swap_qat_modules(gm, mapping, build, Skip.build(["3"])) == ["0", "2"]
    assert axes == [0, 1]  # each QAT type's weight channel axis
    assert type(gm.get_submodule("0")) is QAT_MODULES[nn.Linear] and type(gm.get_submodule("3")) is nn.Linear
    assert gm.get_submodule("2").weight_fake_quant.qname == "2.weight_fake_quant"
