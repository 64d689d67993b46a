"""mq_core.testing.golden: the parts the backend golden tests do not reach (their errors, scalar zero points)."""

from __future__ import annotations

import pytest

import mq_core as mq
from mq_core.testing.golden import TinyNet, set_qparams, tiny_inputs


def test_set_qparams_broadcasts_a_scalar_zero_point_and_refuses_unknown_names() -> None:
    qmodel = mq.prepare(TinyNet().eval(), "qdq", tiny_inputs())
    set_qparams(qmodel, {"x_fq": (0.5, 3), "conv.weight_fake_quant": ([0.25, 0.125], 0)})
    fqs = mq.quantizers(qmodel)
    assert (fqs["x_fq"].scale.item(), fqs["x_fq"].zero_point.item()) == (0.5, 3)
    assert fqs["conv.weight_fake_quant"].scale.tolist() == [0.25, 0.125]
    assert fqs["conv.weight_fake_quant"].zero_point.tolist() == [0, 0]

    with pytest.raises(mq.UnknownNameError, match=r"'flatten_fq', 'fc_weight'.*x_fq") as err:
        set_qparams(qmodel, {"x_fq": (1.0, 0), "flatten_fq": (0.1, 0), "fc_weight": (0.1, 0)})
    assert "conv.weight_fake_quant" in str(err.value)
    assert fqs["x_fq"].scale.item() == 0.5  # nothing was set
    with pytest.raises(ValueError, match="fc_fq: 2 scale"):
        set_qparams(qmodel, {"fc_fq": ([0.1, 0.2], [0, 0, 0])})


def test_tiny_net_shapes_and_hand_set_values() -> None:
    model = TinyNet(3, 4, kernel=3, size=5, classes=7, fc_bias=range(7))
    assert model.fc.in_features == 4 * 3 * 3 and model.fc.bias.tolist() == list(range(7))
    assert model(tiny_inputs(1, 3, 5)).shape == (1, 7)
    assert tiny_inputs(span=(0.0, 7.0)).flatten().tolist() == list(range(8))
    with pytest.raises(ValueError, match=r"conv.weight has shape \(2, 1, 1, 1\)"):
        TinyNet(conv_weight=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="nothing to flatten"):
        TinyNet(kernel=3)
