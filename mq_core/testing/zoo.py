"""A small zoo of real architectures for conformance tests, examples and benchmarks.

Each covers a structure deploy paths break on: residual adds, depthwise convs with ReLU6, transposed convs with
skip concatenation and upsampling, Linear + BatchNorm1d, and attention (matmul, softmax, layer norm). They are
small enough to run through every runtime in seconds; BN statistics are randomised so folding is exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, + identity or 1x1 projection, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + identity)


class TinyResNet(nn.Module):
    """ResNet-style classifier: stem, max-pool, two stages of basic blocks, global pool, Linear."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6 (unless ``expand`` is 1), 3x3 depthwise + ReLU6, 1x1 project, residual
    when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        expansion = [*_conv_bn(cin, hidden, 1), nn.ReLU6()] if expand != 1 else []  # none at 1, as torchvision
        self.block = nn.Sequential(
            *expansion,
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            *_conv_bn(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class TinyMobileNet(nn.Module):
    """MobileNetV2-style: depthwise separable inverted residuals, ReLU6, dropout + Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 8, 3, 2), nn.ReLU6(),
            InvertedResidual(8, 8, 1), InvertedResidual(8, 12, 2), InvertedResidual(12, 12, 1),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(12, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyUNet(nn.Module):
    """Encoder-decoder: strided convs down, ConvTranspose+BN+ReLU up, skip concatenation, nearest upsampling."""

    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(*_conv_bn(3, 8), nn.ReLU())
        self.enc2 = nn.Sequential(*_conv_bn(8, 16, 3, 2), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.fuse = nn.Sequential(*_conv_bn(16, 8), nn.ReLU())
        self.head = nn.Conv2d(8, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        up = F.relu(self.up_bn(self.up(s2)))
        y = self.fuse(torch.cat([up, s1], dim=1))
        coarse = F.interpolate(self.head(F.avg_pool2d(y, 2)), scale_factor=2.0, mode="nearest")
        return self.head(y) + coarse


class MLPBN(nn.Module):
    """Tabular MLP: Linear + BatchNorm1d + ReLU twice, then a Linear classifier."""

    def __init__(self, in_features: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionBlock(nn.Module):
    """Pre-norm transformer encoder block with explicit multi-head attention (matmul, softmax) and a GELU MLP."""

    def __init__(self, dim: int = 16, heads: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.cls = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (d // h) ** -0.5, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(y)
        x = x + self.mlp(self.norm2(x))
        return self.cls(x.mean(dim=1))


class ResNet18(nn.Module):
    """ResNet-18's shape (BasicBlock [2, 2, 2, 2], 64-512 channels, 7x7 stem) for benchmarks at 224x224; too slow
    for the conformance zoo, which uses the small models below."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layers(self.pool(self.stem(x)))), 1))


class MobileNetV2(nn.Module):
    """MobileNetV2's shape as torchvision builds it: a stride-2 3x3 stem, the 17 inverted residual blocks of the
    paper (expansion 6, except 1 in the first; depthwise 3x3, ReLU6, linear 1x1 projection, residual where the
    shape allows), a 1x1 conv to 1280 channels, global pooling, dropout and a Linear. ``width`` scales every
    channel count but the last conv's (rounded to multiples of 8, as torchvision's width multiplier does)."""

    #: (expansion, channels, blocks, first stride) per stage, torchvision's ``inverted_residual_setting``
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0, last_channel: int = 1280) -> None:
        super().__init__()

        def channels(c: int) -> int:
            return max(8, int(c * width + 4) // 8 * 8)

        cin = channels(32)
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, cin, 3, 2), nn.ReLU6())]
        for expand, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, channels(c), s if i == 0 else 1, expand))
                cin = channels(c)
        layers.append(nn.Sequential(*_conv_bn(cin, last_channel, 1), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _init_like_torchvision(model: nn.Module, seed: int, size: int, linear_std: float | None = None) -> nn.Module:
    """Initialise as torchvision does (convs kaiming-normal, fan_out; BN weight 1, bias 0; Linear weights
    N(0, ``linear_std``) and zero bias where given, else PyTorch's default), then set BN statistics on two batches
    of eight random ``size`` x ``size`` images; eval mode."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics: the plain average over the batches below
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


def resnet18(num_classes: int = 10, seed: int = 0, size: int = 64) -> nn.Module:
    """``ResNet18`` initialised as torchvision does, with BN statistics set on random ``size`` x ``size`` images,
    in eval mode: a deep network whose activations drift between torch and a runtime the way a real one's do (the
    layer-wise verification's test model). Not in ``ZOO``: too slow for the backend matrix."""
    torch.manual_seed(seed)
    return _init_like_torchvision(ResNet18(num_classes), seed, size)


def mobilenet_v2(num_classes: int = 10, seed: int = 0, size: int = 64, width: float = 0.5) -> nn.Module:
    """``MobileNetV2`` (all 17 blocks, the 1280-channel last conv; other channels scaled by ``width``) initialised
    as torchvision does, with BN statistics set on random ``size`` x ``size`` images, in eval mode: depth, ReLU6
    and depthwise convs as a real one has them. Not in ``ZOO``: too slow for the backend matrix."""
    torch.manual_seed(seed)
    return _init_like_torchvision(MobileNetV2(num_classes, width), seed, size, linear_std=0.01)


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: name, a factory for the float model (eval mode, randomised BN stats) and an input shape."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.factory()
        randomize_bn(model, seed)
        return model.eval()

    def inputs(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape[1:]), generator=gen)

    def calibration_data(self, batches: int = 4, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
        return [self.inputs(batch, seed + i) for i in range(batches)]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (as a trained model has)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in (
        ZooModel("resnet", TinyResNet, (1, 3, 16, 16), "residual blocks, max/avg pooling, Linear head"),
        ZooModel("mobilenet", TinyMobileNet, (1, 3, 16, 16), "depthwise inverted residuals with ReLU6"),
        ZooModel("unet", TinyUNet, (1, 3, 16, 16), "ConvTranspose+BN, skip concat, nearest upsampling"),
        ZooModel("mlp_bn", MLPBN, (1, 16), "Linear + BatchNorm1d + ReLU"),
        ZooModel("attention", AttentionBlock, (1, 6, 16), "multi-head attention with matmul/softmax/LayerNorm"),
    )
}
