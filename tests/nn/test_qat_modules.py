"""QAT modules: simulated BN folding, eval == deploy bit for bit, and float round trips for every class."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mq_core.errors import SchemeError
from mq_core.nn import (
    QAT_MODULES,
    ConvBn2d,
    ConvBnReLU2d,
    FrozenBatchNorm2d,
    FusedModule,
    LinearBn1d,
    QATBnModule,
    QATModule,
    QConv2d,
    QConvBn2d,
    QConvTranspose2d,
    QLinearBn1d,
    freeze_bn,
    unfreeze_bn,
)
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.scheme import QuantScheme

pytestmark = pytest.mark.usefixtures("deterministic")


def weight_fq(axis: int = 0, quantize: bool = True) -> FakeQuantizer:
    scheme = QuantScheme(8, per_channel=True, narrow_range=True, ch_axis=axis)
    fq = FakeQuantizer(scheme, MinMaxObserver(scheme))
    fq.enable_observation(True)
    fq.enable_quantization(quantize)
    return fq


def randomize_bn(bn: nn.Module) -> nn.Module:
    channels = bn.running_mean.numel()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) * 2 + 0.2)
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
    return bn


#: torch layer -> (factory, BatchNorm type, input shape). The ConvTransposes have groups=2 (weight axis 1 is then
#: out/groups wide), Conv2d a non-zeros padding mode.
LAYERS = {
    nn.Conv1d: (lambda: nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d, (2, 4, 9)),
    nn.Conv2d: (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d, (2, 4, 8, 8)),
    nn.Conv3d: (lambda: nn.Conv3d(3, 4, 3, bias=False), nn.BatchNorm3d, (2, 3, 5, 5, 5)),
    nn.ConvTranspose1d: (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2),
        nn.BatchNorm1d,
        (2, 4, 7),
    ),
    nn.ConvTranspose2d: (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
        nn.BatchNorm2d,
        (2, 4, 5, 5),
    ),
    nn.Linear: (lambda: nn.Linear(5, 7), nn.BatchNorm1d, (6, 5)),
}


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def build(float_type: type[nn.Module]) -> tuple[nn.Module, tuple[int, ...]]:
    layer_type = float_type.layer_type if issubclass(float_type, FusedModule) else float_type
    make_layer, bn_type, shape = LAYERS[layer_type]
    layer = make_layer()
    if not issubclass(float_type, FusedModule):
        return layer, shape
    modules = [layer]
    if float_type.has_bn:
        modules.append(randomize_bn(bn_type(_out_channels(layer))))
    if float_type.has_act:
        modules.append(nn.ReLU6() if float_type.has_bn else nn.ReLU())
    return float_type(*modules), shape


def to_qat(mod: nn.Module, quantize: bool = True) -> nn.Module:
    qat_type = QAT_MODULES[type(mod)]
    return qat_type.from_float(mod, weight_fq(qat_type.weight_ch_axis, quantize))


KEYS = sorted(QAT_MODULES, key=lambda t: t.__name__)
BN_KEYS = [t for t in KEYS if issubclass(QAT_MODULES[t], QATBnModule)]


@pytest.mark.parametrize("float_type", KEYS, ids=lambda t: t.__name__)
def test_round_trip_without_quantization_reproduces_float(float_type: type[nn.Module]) -> None:
    """Float -> QAT -> float: the QAT type is the layer type (a QConv2d is an nn.Conv2d), equals the float module
    with quantization off, and converts back to a plain layer with BN folded that equals it too."""
    qat_type = QAT_MODULES[float_type]
    layer_type = float_type.layer_type if issubclass(float_type, FusedModule) else float_type
    has_bn = issubclass(float_type, FusedModule) and float_type.has_bn
    assert issubclass(qat_type, QATModule) and issubclass(qat_type, layer_type)
    assert issubclass(qat_type, QATBnModule) == has_bn
    mod, shape = build(float_type)
    qat = to_qat(mod, quantize=False)
    assert isinstance(qat, qat_type)
    assert isinstance(qat.weight_fake_quant, FakeQuantizer)
    assert qat.weight_fake_quant.ch_axis == qat_type.weight_ch_axis
    x = torch.randn(shape)
    for training in (False, True):
        reference = copy.deepcopy(mod).train(training)
        qat.train(training)
        torch.testing.assert_close(qat(x), reference(x), atol=1e-5, rtol=0)
        for name, buffer in reference.named_buffers():
            qat_name = name.replace("0.", "", 1) if name.startswith("0.") else name.replace("1.", "bn.", 1)
            torch.testing.assert_close(qat.get_buffer(qat_name), buffer, atol=1e-6, rtol=0)
    with torch.no_grad():  # reference has seen the same training batch as qat, so their statistics agree
        expected = reference.eval()(x)
        deploy = qat.eval().to_float()
        layer = deploy[0] if isinstance(deploy, nn.Sequential) else deploy
        assert type(layer) is layer_type  # a plain torch layer, BN folded into it
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
        assert isinstance(deploy, nn.Sequential) == (issubclass(float_type, FusedModule) and float_type.has_act)
        torch.testing.assert_close(deploy(x), expected, atol=1e-5, rtol=0)
        # with weight quantization on, the QAT module equals its deploy layer with a fake-quantized weight
        qat.weight_fake_quant.enable_observation(False)
        qat.weight_fake_quant.enable_quantization(True)
        layer.weight.copy_(qat.weight_fake_quant(layer.weight))
        torch.testing.assert_close(qat(x), deploy(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(qat(x), expected, atol=1e-6)


def test_qat_layers_refuse_a_per_channel_axis_that_is_not_the_output_channels() -> None:
    scheme = QuantScheme(8, per_channel=True, ch_axis=1)
    with pytest.raises(SchemeError, match="axis 0"):
        QAT_MODULES[nn.Conv2d].from_float(nn.Conv2d(2, 4, 1), FakeQuantizer(scheme))
    with pytest.raises(SchemeError, match="axis 1"):
        QAT_MODULES[nn.ConvTranspose2d].from_float(nn.ConvTranspose2d(2, 4, 1),
                                                   FakeQuantizer(scheme.replace(ch_axis=0)))


@pytest.mark.parametrize("float_type", BN_KEYS, ids=lambda t: t.__name__)
def test_eval_equals_deploy_bit_exact(float_type: type[nn.Module]) -> None:
    mod, shape = build(float_type)
    qat = to_qat(mod)
    x = torch.randn(shape)
    qat.train()(x)  # calibrates the weight quantizer on w * gamma / sigma
    qat.weight_fake_quant.enable_observation(False)
    qat.eval()
    deploy = qat.to_float()
    layer = deploy[0] if isinstance(deploy, nn.Sequential) else deploy
    assert type(layer) is mod.layer_type
    weight, bias = qat.deploy_weight_and_bias()
    assert torch.equal(weight, layer.weight) and torch.equal(bias, layer.bias)
    with torch.no_grad():
        y_deploy = functional_call(layer, {"weight": qat.weight_fake_quant(layer.weight), "bias": layer.bias}, (x,))
        if isinstance(deploy, nn.Sequential):
            y_deploy = deploy[1](y_deploy)
        assert torch.equal(qat(x), y_deploy)


@pytest.mark.parametrize("float_type", BN_KEYS, ids=lambda t: t.__name__)
def test_training_matches_rescaling_the_output_as_torch_does(float_type: type[nn.Module]) -> None:
    """mq undoes gamma / sigma on the quantized weight; Jacob et al. (and torch's ConvBn) undo it on the layer output.
    Both are the same function of the input and of every parameter, gradients included (compared in float64, where
    the different order of the float operations cannot hide a real difference)."""
    mod, shape = build(float_type)
    qat = to_qat(mod).double().train()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    qat(x)  # calibrates the weight quantizer
    qat.weight_fake_quant.enable_observation(False)
    reference = copy.deepcopy(qat)
    y = qat(x)

    ref_bn = reference.bn
    factor = ref_bn.weight / torch.sqrt(ref_bn.running_var + ref_bn.eps)
    weight = reference.weight_fake_quant(qat_channel_scaled(reference, factor))
    out = reference._op(x, weight, None)
    view = (1, -1, *([1] * (out.dim() - 2)))
    out = out / factor.reshape(view)
    if reference.bias is not None:
        out = out + reference.bias.reshape(view)
    y_ref = reference._activate(ref_bn(out))
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(qat.bn.running_mean, ref_bn.running_mean, atol=1e-12, rtol=1e-10)

    grads = torch.autograd.grad(y.square().sum(), [x, qat.weight, qat.bn.weight, qat.bn.bias])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, reference.weight, ref_bn.weight, ref_bn.bias])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def qat_channel_scaled(qat: QATBnModule, factor: torch.Tensor) -> torch.Tensor:
    """``w * factor`` per output channel, written out for each weight layout (ConvTranspose: [in, out/groups, k])."""
    weight = qat.weight
    if isinstance(qat, nn.ConvTranspose1d | nn.ConvTranspose2d):
        groups, per_group = qat.groups, weight.shape[1]
        scaled = weight.reshape(groups, -1, per_group, *weight.shape[2:])
        scaled = scaled * factor.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
        return scaled.reshape(weight.shape)
    return weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))


@pytest.mark.parametrize("float_type", BN_KEYS, ids=lambda t: t.__name__)
def test_frozen_training_equals_eval(float_type: type[nn.Module]) -> None:
    mod, shape = build(float_type)
    qat = to_qat(mod)
    x = torch.randn(shape)
    qat.train()
    freeze_bn(qat)
    stats = {name: b.clone() for name, b in qat.bn.named_buffers()}
    y_train = qat(x)
    for name, buffer in qat.bn.named_buffers():
        assert torch.equal(buffer, stats[name]), f"frozen BN updated {name}"
    assert torch.equal(y_train, qat.eval()(x))
    unfreeze_bn(qat)
    assert not qat.bn_frozen


def test_training_uses_batch_statistics() -> None:
    conv, bn = nn.Conv2d(3, 8, 3), randomize_bn(nn.BatchNorm2d(8))
    qat = to_qat(ConvBn2d(conv, bn)).train()
    y = qat(torch.randn(16, 3, 10, 10) * 3 + 1)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), qat.bn.bias.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), qat.bn.weight.detach().abs(), atol=1e-2, rtol=1e-2)


def test_bn_eps_and_momentum_survive() -> None:
    conv, bn = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    qat = to_qat(ConvBn2d(conv, bn))
    assert (qat.bn.eps, qat.bn.momentum) == (1e-3, 0.3)
    seen = []
    qat.bn.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    before = qat.bn.running_mean.clone()
    qat.train()(torch.randn(4, 3, 6, 6))
    batch_mean = seen[0].mean(dim=(0, 2, 3))
    torch.testing.assert_close(qat.bn.running_mean, 0.7 * before + 0.3 * batch_mean, atol=1e-6, rtol=0)
    assert torch.equal(bn.running_mean, before), "from_float must not alias the float BN"
    weight, bias = qat.deploy_weight_and_bias()
    scale = qat.bn.weight / torch.sqrt(qat.bn.running_var + 1e-3)
    torch.testing.assert_close(weight, qat.weight * scale.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(bias, qat.bn.bias + (qat.bias - qat.bn.running_mean) * scale)


@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_reach_weight_and_bn(frozen: bool) -> None:
    qat = to_qat(ConvBnReLU2d(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)), nn.ReLU())).train()
    qat.freeze_bn(frozen)
    qat(torch.randn(4, 3, 6, 6)).square().mean().backward()
    for param in (qat.weight, qat.bias, qat.bn.weight, qat.bn.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_linear_bn1d_both_modes() -> None:
    mod = LinearBn1d(nn.Linear(5, 7), randomize_bn(nn.BatchNorm1d(7)))
    qat = to_qat(mod)
    assert type(qat) is QLinearBn1d and isinstance(qat, nn.Linear)
    x = torch.randn(8, 5)
    assert qat.train()(x).shape == (8, 7)
    error = qat.eval()(x) - mod.eval()(x)
    assert error.norm() < 0.05 * mod(x).norm()  # 8-bit weights: close to float, not equal


def test_frozen_batch_norm_stays_frozen() -> None:
    bn = FrozenBatchNorm2d(4)
    qat = to_qat(ConvBn2d(nn.Conv2d(3, 4, 1), bn))
    qat.freeze_bn(False)
    assert qat.bn_frozen
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(qat.train()(x), qat.eval()(x))


def test_from_float_copies_and_keeps_flags() -> None:
    conv = nn.Conv2d(3, 4, 3)
    conv.weight.requires_grad_(False)
    qat = QConv2d.from_float(conv.eval(), weight_fq())
    assert isinstance(qat, nn.Conv2d) and not qat.training
    assert not qat.weight.requires_grad and qat.bias.requires_grad
    assert qat.weight.data_ptr() != conv.weight.data_ptr()
    assert qat.weight.dtype == conv.weight.dtype and qat.weight.device == conv.weight.device


def test_from_float_rejects_mismatches() -> None:
    with pytest.raises(SchemeError, match="axis 1"):
        QConvTranspose2d.from_float(nn.ConvTranspose2d(4, 6, 3), weight_fq(axis=0))
    with pytest.raises(TypeError, match="no BatchNorm"):
        QConv2d.from_float(ConvBn2d(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), weight_fq())
    with pytest.raises(TypeError, match="needs a BatchNorm"):
        QConvBn2d.from_float(nn.Conv2d(3, 4, 1), weight_fq())
    with pytest.raises(TypeError, match="cannot convert"):
        QConv2d.from_float(nn.Conv1d(3, 4, 1), weight_fq())


def test_conv_transpose_output_size() -> None:
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
    qat = QConvTranspose2d.from_float(layer, weight_fq(axis=1, quantize=False))
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(qat(x, output_size=[10, 10]), layer(x, output_size=[10, 10]), atol=1e-5, rtol=0)


def test_to_float_keeps_activation() -> None:
    qat = to_qat(ConvBnReLU2d(nn.Conv2d(3, 4, 1), randomize_bn(nn.BatchNorm2d(4)), nn.ReLU6()))
    deploy = qat.to_float()
    assert isinstance(deploy, nn.Sequential) and type(deploy[0]) is nn.Conv2d and type(deploy[1]) is nn.ReLU6
    assert deploy[1] is not qat.act
