"""LSQ QAT on real data: W4A4 LSQ on the digits CNN recovers float accuracy, exports, and verifies in ONNX Runtime.

Runs single-threaded (the machine's cores are shared; one thread is both faster there and reproducible) and takes
well under a minute: 12 float epochs (cached in a per-test MQ_CACHE_DIR, never the user's cache) and 5 QAT epochs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import train_qat

import mq_core as mq
from mq_core.demo.digits import accuracy, load_digits, pretrained

log = logging.getLogger(__name__)

QAT_EPOCHS = 5
#: Epoch from which BatchNorm uses (and stops updating) its running statistics, as the deploy model does.
FREEZE_BN_EPOCH = 3


def test_w4a4_lsq_qat_recovers_float_accuracy_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deterministic: None
) -> None:
    monkeypatch.setenv("MQ_CACHE_DIR", str(tmp_path / "cache"))
    data = load_digits()
    model = pretrained("cnn")
    float_accuracy = accuracy(model, data.x_test, data.y_test)
    assert float_accuracy > 97.0

    example = data.x_train[:64]
    qmodel = mq.prepare(model, "qdq", (example,), qconfig="w4a4-lsq", mode="qat")
    mq.calibrate(qmodel, data.calibration_batches(), progress=False)
    calibrated_accuracy = accuracy(qmodel, data.x_test, data.y_test)

    train_qat(qmodel, data, QAT_EPOCHS, FREEZE_BN_EPOCH)  # after calibrate: it sized the LSQ step sizes
    qat_accuracy = accuracy(qmodel, data.x_test, data.y_test)
    log.info("float %.2f%%, W4A4 LSQ calibrated %.2f%%, after QAT %.2f%%", float_accuracy, calibrated_accuracy,
             qat_accuracy)
    assert qat_accuracy >= float_accuracy - 1.0
    assert qat_accuracy > calibrated_accuracy

    result = mq.export(qmodel, (example,), tmp_path / "export")
    report = mq.verify(result, (data.x_test[:128],), runtimes="onnxruntime")
    assert report.passed, report.table()
