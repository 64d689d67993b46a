"""BatchNorm folding and the float fused containers: folded layers must equal layer -> BN in eval mode."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from mq_core.nn import (
    FUSED_MODULES,
    ConvBn2d,
    ConvBnReLU2d,
    ConvReLU2d,
    ConvTransposeBn2d,
    FrozenBatchNorm2d,
    LinearBn1d,
    LinearReLU,
    bn_scale_factor,
    fold_bn,
    fold_weight,
    fuse_modules,
)

pytestmark = pytest.mark.usefixtures("deterministic")


def randomize_bn(bn: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters, so that folding errors cannot hide behind identities."""
    channels = bn.running_mean.numel()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) * 2 + 0.2)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(channels))
            bn.bias.copy_(torch.randn(channels))
    return bn


CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: nn.BatchNorm1d(6), (2, 4, 9)),
    "conv1d-nobias": (lambda: nn.Conv1d(4, 6, 3, bias=False), lambda: nn.BatchNorm1d(6), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: nn.BatchNorm2d(6), (2, 4, 8, 8)),
    "conv2d-nobias": (lambda: nn.Conv2d(4, 6, 3, bias=False), lambda: nn.BatchNorm2d(6), (2, 4, 8, 8)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.BatchNorm2d(6), (2, 4, 8, 8)),
    "conv2d-depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False), lambda: nn.BatchNorm2d(6), (2, 6, 8, 8)),
    "conv2d-reflect": (
        lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        lambda: nn.BatchNorm2d(6),
        (2, 4, 8, 8),
    ),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3), lambda: nn.BatchNorm3d(4), (2, 3, 5, 5, 5)),
    "conv3d-nobias": (lambda: nn.Conv3d(3, 4, 3, bias=False), lambda: nn.BatchNorm3d(4), (2, 3, 5, 5, 5)),
    "convT1d": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1),
        lambda: nn.BatchNorm1d(6),
        (2, 4, 7),
    ),
    "convT1d-groups": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2, bias=False),
        lambda: nn.BatchNorm1d(6),
        (2, 4, 7),
    ),
    "convT2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1),
        lambda: nn.BatchNorm2d(6),
        (2, 4, 5, 5),
    ),
    "convT2d-groups": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
        lambda: nn.BatchNorm2d(6),
        (2, 4, 5, 5),
    ),
    "linear": (lambda: nn.Linear(5, 7), lambda: nn.BatchNorm1d(7), (6, 5)),
    "linear-nobias": (lambda: nn.Linear(5, 7, bias=False), lambda: nn.BatchNorm1d(7), (6, 5)),
    "bn-not-affine": (lambda: nn.Conv2d(4, 6, 3), lambda: nn.BatchNorm2d(6, affine=False), (2, 4, 8, 8)),
    "frozen-bn": (lambda: nn.Conv2d(4, 6, 3), lambda: FrozenBatchNorm2d(6, eps=1e-3), (2, 4, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_bn_matches_layer_then_bn(case: str) -> None:
    make_layer, make_bn, shape = CASES[case]
    layer, bn = make_layer().eval(), randomize_bn(make_bn()).eval()
    x = torch.randn(shape)
    folded = fold_bn(layer, bn)
    assert type(folded) is type(layer)
    assert folded is not layer and folded.bias is not None
    assert folded.weight.data_ptr() != layer.weight.data_ptr()
    with torch.no_grad():
        expected = bn(layer(x))
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=0)


def test_fold_weight_grouped_conv_transpose_maps_output_channels() -> None:
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
    factor = torch.arange(1.0, 7.0)
    folded = fold_weight(layer.weight, layer, factor)
    in_per_group, out_per_group = 2, 3
    for c in range(6):
        g, j = divmod(c, out_per_group)
        rows = slice(g * in_per_group, (g + 1) * in_per_group)
        torch.testing.assert_close(folded[rows, j], layer.weight[rows, j] * factor[c], atol=0, rtol=0)


def test_bn_scale_factor() -> None:
    bn = randomize_bn(nn.BatchNorm2d(3, eps=1e-3))
    torch.testing.assert_close(bn_scale_factor(bn), bn.weight / torch.sqrt(bn.running_var + 1e-3))


def test_fold_keeps_requires_grad_and_training_flag() -> None:
    layer, bn = nn.Conv2d(2, 3, 1), randomize_bn(nn.BatchNorm2d(3))
    layer.weight.requires_grad_(False)
    folded = fold_bn(layer.train(), bn)
    assert not folded.weight.requires_grad and folded.bias.requires_grad
    assert folded.training


def test_frozen_batch_norm_matches_torch_batch_norm_in_eval() -> None:
    bn = randomize_bn(nn.BatchNorm2d(5, eps=1e-3)).eval()
    frozen = FrozenBatchNorm2d(5, eps=1e-3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, as in torchvision
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-5, rtol=0)
    assert not list(frozen.parameters())


@pytest.mark.parametrize(
    ("layer", "bn", "match"),
    [
        (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), "output channels"),
        (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), "track_running_stats"),
        (nn.Conv2d(3, 4, 1), nn.LayerNorm(4), "not a BatchNorm"),
        (type("MyConv", (nn.Conv2d,), {})(3, 4, 1), nn.BatchNorm2d(4), "exact types"),
        (nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(4), "output channels"),
    ],
)
def test_fold_bn_rejects_bad_combinations(layer: nn.Module, bn: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fold_bn(layer, bn)


def test_fuse_modules_ptq_folds_now() -> None:
    conv, bn, act = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)).eval(), nn.ReLU6()
    x = torch.randn(2, 3, 6, 6) * 4
    plain = fuse_modules(conv, bn, fold=True)
    assert type(plain) is nn.Conv2d
    fused = fuse_modules(conv, bn, act, fold=True)
    assert type(fused) is ConvReLU2d and fused.act is act
    with torch.no_grad():
        torch.testing.assert_close(fused(x), act(bn(conv(x))), atol=1e-5, rtol=0)
    assert type(fuse_modules(conv, act=nn.ReLU(), fold=True)) is ConvReLU2d


def test_fuse_modules_qat_keeps_bn_in_container() -> None:
    conv, bn, act = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)), nn.ReLU()
    fused = fuse_modules(conv, bn, act, fold=False)
    assert type(fused) is ConvBnReLU2d
    assert (fused.layer, fused.bn, fused.act) == (conv, bn, act)
    assert type(fuse_modules(conv, bn, fold=False)) is ConvBn2d
    assert type(fuse_modules(nn.Linear(3, 4), nn.BatchNorm1d(4), fold=False)) is LinearBn1d
    assert type(fuse_modules(nn.Linear(3, 4), act=nn.ReLU6(), fold=False)) is LinearReLU
    assert type(fuse_modules(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4), fold=False)) is ConvTransposeBn2d
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), act(bn(conv(x))), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("bn", "act", "match"),
    [
        (None, None, "nothing to fuse"),
        (nn.BatchNorm2d(5), None, "output channels"),
        (None, nn.GELU(), "only ReLU and ReLU6"),
    ],
)
def test_fuse_modules_validates(bn: nn.Module | None, act: nn.Module | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fuse_modules(nn.Conv2d(3, 4, 1), bn, act, fold=False)


def test_containers_validate_their_slots() -> None:
    with pytest.raises(ValueError, match="holds a Conv2d"):
        ConvBn2d(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="takes 3 modules"):
        ConvBnReLU2d(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


def test_containers_are_importable_and_picklable() -> None:
    assert len(FUSED_MODULES) == 18
    for (layer_type, has_bn, has_act), container in FUSED_MODULES.items():
        assert container.__module__ == "mq_core.nn.fused"
        assert container.layer_type is layer_type and (container.has_bn, container.has_act) == (has_bn, has_act)
    fused = ConvBnReLU2d(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    assert type(pickle.loads(pickle.dumps(fused))) is ConvBnReLU2d
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is ConvBnReLU2d
