"""LSQ QAT on real data: W4A4 LSQ on the digits CNN recovers float accuracy, exports, and verifies in ONNX Runtime.

Runs single-threaded (the machine's cores are shared; one thread is both faster there and reproducible) and takes
well under a minute: 12 float epochs (cached in a per-test MQ_CACHE_DIR, never the user's cache) and 5 QAT epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mq_core as mq
from mq_core.demo.digits import accuracy, load_digits, pretrained

log = logging.getLogger(__name__)

QAT_EPOCHS = 5
#: Epoch from which BatchNorm uses (and stops updating) its running statistics, as the deploy model does.
FREEZE_BN_EPOCH = 3


@pytest.fixture
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_w4a4_lsq_qat_recovers_float_accuracy_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
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

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=5e-4)  # after calibrate: it sized the LSQ step sizes
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, QAT_EPOCHS)
    for epoch in range(QAT_EPOCHS):
        qmodel.train()
        if epoch == FREEZE_BN_EPOCH:
            mq.freeze_bn(qmodel)
        for xb, yb in data.train_batches(batch_size=64, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(qmodel(xb), yb).backward()
            optimizer.step()
        schedule.step()
    qat_accuracy = accuracy(qmodel, data.x_test, data.y_test)
    log.info("float %.2f%%, W4A4 LSQ calibrated %.2f%%, after QAT %.2f%%", float_accuracy, calibrated_accuracy,
             qat_accuracy)
    assert qat_accuracy >= float_accuracy - 1.0
    assert qat_accuracy > calibrated_accuracy

    result = mq.export(qmodel, (example,), tmp_path / "export")
    report = mq.verify(result, (data.x_test[:128],), runtimes="onnxruntime")
    assert report.passed, report.table()
