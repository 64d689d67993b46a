"""DoReFa weights on Conv+BN in QAT (issue 10, point 14).

DoReFa normalises the weight (``tanh(w) / max|tanh(w)|``), so a BN fold factor put in before it vanished and the
division after it put ``sigma_running / gamma`` into the weight: BN's running variance grew with itself every
step (1.85 -> 4.9e13 by step 50, NaN by step 129 on the digits CNN). The QAT BN layers now fold after a
normalising quantizer. Single-threaded; the digits run takes a few seconds (float model trained once per module
into a private cache).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import train_qat
from mq_algos.quantizers.dorefa import DoReFaFakeQuantizer, bake_dorefa
from torch import nn

import mq_core as mq
from mq_core import SchemeError
from mq_core.demo.digits import DigitsData, accuracy, load_digits, pretrained
from mq_core.nn import ConvBn2d, QATBnModule, QConvBn2d
from mq_core.quant.scheme import QuantScheme

pytestmark = pytest.mark.usefixtures("deterministic")

EPOCHS = 7  # 22 steps each: ~150 steps, three times as many as the old code needed to reach 1e13
FREEZE_BN_EPOCH = 5


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[DigitsData, nn.Module]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return load_digits(), pretrained("cnn")
        finally:
            torch.set_num_threads(threads)


def dorefa_conv_bn(running_var: float) -> QConvBn2d:
    scheme = QuantScheme(4, per_channel=True)
    fq = DoReFaFakeQuantizer(scheme, mq.get_observer("minmax")(scheme))
    fq.set_qparams(torch.ones(6), torch.zeros(6, dtype=torch.int32))
    fq.enable_quantization(True)
    bn = nn.BatchNorm2d(6, momentum=1.0)  # running statistics = this batch's: shows what the BN saw
    with torch.no_grad():
        bn.running_var.fill_(running_var)
        bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
    return QConvBn2d.from_float(ConvBn2d(nn.Conv2d(3, 6, 3, bias=False), bn), fq).train()


def test_batch_norm_sees_the_dorefa_weight_whatever_its_running_variance() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    small, huge = dorefa_conv_bn(1.0), dorefa_conv_bn(1e6)
    huge.load_state_dict({k: v for k, v in small.state_dict().items() if "running" not in k}, strict=False)
    small(x), huge(x)
    expected = F.conv2d(x, small.weight_fake_quant(small.weight)).transpose(0, 1).flatten(1).var(dim=1)
    torch.testing.assert_close(small.bn.running_var, expected)
    torch.testing.assert_close(huge.bn.running_var, expected)  # the old fold gave 1e6 times more


def test_dorefa_pact_trains_the_digits_cnn_to_float_accuracy_and_deploys(
    digits: tuple[DigitsData, nn.Module], tmp_path
) -> None:
    data, model = digits
    float_accuracy = accuracy(model, data.x_test, data.y_test)
    example = data.x_train[:64]
    qmodel = mq.prepare(model, "qdq", (example,), qconfig="w4a4-dorefa-pact", mode="qat")
    mq.calibrate(qmodel, data.calibration_batches(), progress=False)
    bns = [m.bn for m in qmodel.modules() if isinstance(m, QATBnModule)]
    assert len(bns) == 3

    variances: list[float] = []
    losses = train_qat(qmodel, data, EPOCHS, FREEZE_BN_EPOCH,
                       after_step=lambda: variances.append(max(bn.running_var.max().item() for bn in bns)))
    assert len(losses) >= 150
    bad = [step for step, loss in enumerate(losses) if not math.isfinite(loss)]
    assert not bad, f"loss {losses[bad[0]]} at step {bad[0]}"
    worst_var = max(variances)
    assert worst_var < 1e4, f"BN running variance reached {worst_var:.3g}"  # the old fold: 5e10 by step 25

    qat_accuracy = accuracy(qmodel, data.x_test, data.y_test)
    assert qat_accuracy >= float_accuracy - 2.0, (float_accuracy, qat_accuracy)

    qmodel.eval()
    x = data.x_test[:128]
    with torch.no_grad():
        before = qmodel(x)
    assert bake_dorefa(qmodel) == 4  # three Conv+BN (folded after DoReFa) and the Linear
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)  # baking onto the folded grid changes nothing the model computes
    result = mq.export(qmodel, (example,), tmp_path / "export")
    report = mq.verify(result, (x,), runtimes="onnxruntime")
    assert report.passed, report.table()


def test_per_tensor_dorefa_on_a_batch_norm_layer_is_refused_at_prepare() -> None:
    base = mq.get_backend("qdq").qconfig
    weight = base.weight.replace(scheme=QuantScheme(4), fake_quantizer="dorefa")
    qconfig = mq.QConfig(weight, base.activation, name="dorefa-per-tensor")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(SchemeError, match="per-channel weight grid"):
        mq.prepare(model, "qdq", (torch.rand(2, 1, 6, 6),), qconfig=qconfig, mode="qat")
    # without a BN there is nothing to fold: per-tensor DoReFa is accepted
    mq.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), "qdq", (torch.rand(2, 1, 6, 6),), qconfig=qconfig,
               mode="qat")
