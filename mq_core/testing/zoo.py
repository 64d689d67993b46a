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
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.ReLU6(),
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


def resnet18(num_classes: int = 10, seed: int = 0, size: int = 64) -> nn.Module:
    """``ResNet18`` as torchvision initialises it (convs kaiming-normal, fan_out; BN weight 1, bias 0), with BN
    statistics set on random ``size`` x ``size`` images, in eval mode: a deep network whose activations drift
    between torch and a runtime the way a real one's do (the layer-wise verification's test model). Not in
    ``ZOO``: too slow for the backend matrix."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics: the plain average over the batches below
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


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
