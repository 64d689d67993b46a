"""W8A8 PTQ on real data: the digits CNN, trained on scikit-learn's bundled digits, loses at most half a point of
accuracy when calibrated for each target's 8-bit scheme (weights folded with BN, activations where the target
quantizes them)."""

from __future__ import annotations

import pytest
import torch

import mq_core as mq
from mq_core.demo.digits import accuracy, load_digits, pretrained


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, float]:
    """The demo CNN, trained in a private cache (never the user's), and its float test accuracy."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        model = pretrained("cnn")
    data = load_digits()
    return model, accuracy(model, data.x_test, data.y_test)


@pytest.mark.parametrize("backend", ["qdq", "tensorrt", "snpe", "tvm", "openvino", "tengine"])
def test_w8a8_ptq_stays_within_half_a_point_of_float(trained: tuple[torch.nn.Module, float], backend: str) -> None:
    model, float_accuracy = trained
    data = load_digits()
    assert float_accuracy > 97.0
    qmodel = mq.prepare(model, backend, data.x_train[:8])
    mq.calibrate(qmodel, data.calibration_batches(), progress=False)
    quantized = accuracy(qmodel, data.x_test, data.y_test)
    assert quantized >= float_accuracy - 0.5, f"{backend}: float {float_accuracy:.2f}%, W8A8 {quantized:.2f}%"
    assert qmodel.mq_info.qconfig.weight.scheme.bits == 8 and qmodel.mq_info.qconfig.activation.scheme.bits == 8
