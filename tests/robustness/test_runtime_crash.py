"""A runtime that crashes in native code fails a check; it does not take mq down (runtimes run in worker
processes, ``mq_core.runtimes.isolation``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cli_harness import invoke, user_workdir
from faulty_runtimes import AbortingRuntime, RaisingRuntime

import mq_core as mq
from mq_core.runtimes import isolation
from mq_core.testing.zoo import ZOO


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[mq.ExportResult, torch.Tensor]:
    entry = ZOO["mlp_bn"]
    x = entry.inputs(4)
    qmodel = mq.prepare(entry.build(), "qdq", x)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    return mq.export(qmodel, x, tmp_path_factory.mktemp("mlp")), x


def test_a_native_crash_is_a_failed_check_and_mq_goes_on(exported: tuple[mq.ExportResult, torch.Tensor]) -> None:
    result, x = exported
    report = mq.verify(result, x, runtimes=[AbortingRuntime(), "onnxruntime"])
    assert not report.passed
    (failure,) = report.failures
    assert failure.startswith("aborting crashed (signal 6, SIGABRT) while compiling or running the onnx-qdq "
                              "artifact (in run() at faulty_runtimes.py:")
    assert "not verified by aborting" in failure and f"FAIL: {failure}" in report.table()
    # the other runtime's checks stand, and a crashed worker is replaced by a fresh one on the next call
    assert [c.runtime for c in report.checks] == ["onnxruntime"] and report.checks[0].passed
    with pytest.raises(isolation.RuntimeCrashError, match="SIGABRT"):
        isolation.run(AbortingRuntime(), result.qdq_model, {"x": x.numpy()})


def test_a_runtime_that_raises_is_a_failed_check(exported: tuple[mq.ExportResult, torch.Tensor]) -> None:
    result, x = exported
    report = mq.verify(result, x, runtimes=[RaisingRuntime()])
    assert not report.passed and not report.checks
    assert report.failures == ["raising failed to run the onnx-qdq artifact: RuntimeError: unsupported node Foo"]


def test_a_runtime_that_cannot_reach_a_worker_is_a_failed_check(exported: tuple[mq.ExportResult, torch.Tensor],
                                                               ) -> None:
    result, x = exported

    class LocalRuntime(RaisingRuntime):  # a class inside a function cannot be pickled
        name = "local"

    report = mq.verify(result, x, runtimes=[LocalRuntime()])
    (failure,) = report.failures
    assert failure.startswith("runtime local cannot be sent to a worker process")
    assert "MQ_IN_PROCESS_RUNTIMES" in failure


def test_in_process_runtimes_on_request(exported: tuple[mq.ExportResult, torch.Tensor],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    result, x = exported
    monkeypatch.setenv(isolation.IN_PROCESS_ENV, "1")
    report = mq.verify(result, x, runtimes=[RaisingRuntime(), "onnxruntime"])
    assert [c.runtime for c in report.checks] == ["onnxruntime"] and report.checks[0].exact == 1.0
    assert report.failures == ["raising failed to run the onnx-qdq artifact: RuntimeError: unsupported node Foo"]


CAT_MODEL = """
import torch
from torch import nn


class CatPlusOne(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], 1) + 1.0


def build():
    return CatPlusOne()
"""


def test_openvino_crash_on_qdq_cat_ends_quantize_with_status_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 ) -> None:
    """The case from the field: OpenVINO segfaulted in compile_model on this model's QDQ ONNX and `mq quantize`
    died with status 139. If an OpenVINO release fixes it, the run simply passes."""
    pytest.importorskip("openvino")
    user_workdir(tmp_path, monkeypatch, {"catmodel": CAT_MODEL})
    torch.save(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)), tmp_path / "calib.pt")
    result: Any = invoke("quantize", "--model", "catmodel:build", "--calib", "calib.pt", "--backend", "qdq",
                         "--out", "out", "--quiet")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if "openvino crashed" in result.output:
        assert result.exit_code == 1, result.output
        assert "openvino crashed (signal 11, SIGSEGV) while compiling or running the onnx-qdq artifact" in result.output
        assert "FAIL" in result.output
    else:
        assert result.exit_code == 0, result.output
