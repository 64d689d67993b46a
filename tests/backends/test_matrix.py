"""The backend matrix: every installed backend x every zoo model through the conformance kit.

Every exporter of the backend writes its artifacts, every runtime the backend declares really runs them (none
may be missing: the set-up installs OpenVINO and TVM), and every output agrees with the simulation within one
quantization step. On the canonical QDQ ONNX every quantized tensor is compared element by element with ONNX
Runtime (optimisations off).
"""

from __future__ import annotations

import pytest

import mq_core as mq
from mq_core.testing.zoo import ZOO

BACKENDS = sorted(mq.list_backends())


def test_the_matrix_covers_the_five_targets_and_qdq() -> None:
    assert {"qdq", "tensorrt", "snpe", "tvm", "openvino", "tengine"} <= set(BACKENDS)


@pytest.mark.parametrize("model", sorted(ZOO))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_conforms_on_zoo_model(mq_conformance, backend: str, model: str) -> None:
    result = mq_conformance(backend, model)
    assert result.passed, result.summary()
    declared = set(mq.get_backend(backend).runtimes)
    for exporter, report in result.reports.items():
        missing = [s for s in report.skipped if "not installed" in s]
        assert not missing, f"{backend}/{exporter}: runtimes skipped: {missing}"
        assert {c.runtime for c in report.checks} & declared, f"{exporter} was not run by any declared runtime"
    assert set(result.reports) == set(mq.get_backend(backend).exporters)
    # bit-exact on (almost) every element of every quantized tensor; the rare miss is one step at a float
    # summation-order tie (pooling/conv accumulation order differs between torch and ONNX Runtime)
    assert result.tensor_agreement, "no quantized tensor was compared"
    assert min(result.tensor_agreement.values()) >= 0.98, result.tensor_agreement
