"""The same op applied twice to the same tensor exports and verifies on every backend (issue 10, point 15).

ONNX export merges identical computations (common-subexpression elimination): two ``flatten(y)`` or two
``adaptive_avg_pool2d(y, 1)`` become one node, and their Q/DQ pairs one pair when the qparams agree. The deploy view
computes such a tensor once; quantizers whose qparams differ keep a tensor (and name) each.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mq_core as mq
from mq_core.export.deploy import deploy_view
from mq_core.testing.conformance import run_conformance

pytestmark = pytest.mark.usefixtures("deterministic")

BACKENDS = sorted(mq.list_backends())


class Heads(nn.Module):
    """Four heads on one feature map: two pool it the same way, two flatten it the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pooled_a, self.pooled_b = nn.Linear(4, 3), nn.Linear(4, 2)
        self.flat_a, self.flat_b = nn.Linear(4 * 4 * 4, 3), nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.relu(self.conv(x))
        return (self.pooled_a(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)),
                self.pooled_b(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)),
                self.flat_a(torch.flatten(y, 1)), self.flat_b(torch.flatten(y, 1)))


def calibrated(backend: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    qmodel = mq.prepare(Heads().eval(), backend, (x,))
    mq.calibrate(qmodel, [x, torch.randn(4, 3, 6, 6)], progress=False)
    return qmodel, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_ops_export_and_verify(backend: str, tmp_path: Path) -> None:
    qmodel, x = calibrated(backend)
    shared = deploy_view(qmodel).mq_shared_tensors
    assert shared, "the two heads' duplicates should quantize the same tensor with the same qparams"
    result = mq.export(qmodel, (x,), tmp_path / backend)
    assert result.exporter == mq.get_backend(backend).default_exporter
    assert not set(shared) & set(result.table), "a tensor computed once is listed once"
    report = mq.verify(result, (torch.randn(3, 3, 6, 6),))  # the backend's runtimes: ONNX Runtime, OpenVINO, TVM
    assert report.passed and report.checks, report.table()


def separately_learned(backend: str) -> tuple[nn.Module, torch.Tensor, set[str]]:
    """The duplicates' quantizers no longer agree, as after learning them apart (LSQ, BRECQ)."""
    qmodel, x = calibrated(backend)
    shared = deploy_view(qmodel).mq_shared_tensors
    fqs = {fq.tensor: fq for fq in mq.quantizers(qmodel).values()}
    for dropped in shared:
        with torch.no_grad():
            fqs[dropped].scale.mul_(1.5)
    assert not deploy_view(qmodel).mq_shared_tensors
    return qmodel, x, set(shared)


@pytest.mark.parametrize("backend", ["qdq", "snpe"])
def test_duplicates_with_different_qparams_keep_a_tensor_each(backend: str, tmp_path: Path) -> None:
    qmodel, x, shared = separately_learned(backend)
    result = mq.export(qmodel, (x,), tmp_path / backend)
    tensors = {o for n in result.qdq_model.graph.node for o in n.output} | {i.name for i in
                                                                         result.qdq_model.graph.input}
    assert set(shared) <= set(result.table) and set(shared) <= tensors
    identities = [n for n in result.qdq_model.graph.node if n.op_type == "Identity"]
    assert {n.output[0] for n in identities} == set(shared)  # the merged op's output, one name per quantizer
    onnx.checker.check_model(result.qdq_model)
    report = mq.verify(result, (torch.randn(3, 3, 6, 6),), runtimes="onnxruntime")
    assert report.passed, report.table()


def test_tensorrt_refuses_two_scales_on_one_tensor_clearly(tmp_path: Path) -> None:
    qmodel, x, _ = separately_learned("tensorrt")  # TensorRT propagates Q/DQ through shape ops: one scale each
    with pytest.raises(mq.ExportError, match="one-scale-per-tensor"):
        mq.export(qmodel, (x,), tmp_path / "trt")


def test_conformance_kit_compares_shared_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    calibration = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    result = run_conformance("qdq", Heads().eval(), (calibration[0],), calibration, tmp_path, runtimes=["onnxruntime"])
    assert result.passed, result.summary()
    quantized = {fq.tensor for fq in mq.quantizers(mq.prepare(Heads().eval(), "qdq", (calibration[0],)),
                                                   weights=False).values()}
    assert set(result.tensor_agreement) == quantized  # every quantizer, the shared ones through their survivor
    assert min(result.tensor_agreement.values()) == 1.0
