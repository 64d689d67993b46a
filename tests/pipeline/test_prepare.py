"""The backend matrix: every zoo architecture prepares and calibrates for every installed backend, close to float.

Generic on purpose: a third-party backend plugin can run the same checks by parametrizing over
``(*ALL_BACKENDS, "my-backend")`` from ``mq_core.testing.backends``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

import mq_core as mq
from mq_core.testing.backends import ALL_BACKENDS, backend_or_skip
from mq_core.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("deterministic")


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_prepare_and_calibrate_stay_close_to_float(backend: str, name: str) -> None:
    target = backend_or_skip(backend)
    z = ZOO[name]
    model, data = z.build(), z.calibration_data(3, 8)
    x = data[0]  # within the calibrated range (EMA observers: a batch never seen may clip at the output)
    q = mq.prepare(model, backend, (x,))
    assert q.mq_info.backend == target.name and q.mq_info.qconfig == target.qconfig
    weights = mq.quantizers(q, activations=False)
    acts = mq.quantizers(q, weights=False)
    assert weights and acts
    assert all(fq.scheme == target.qconfig.weight.scheme.replace(ch_axis=fq.scheme.ch_axis) for fq in weights.values())
    assert all(fq.scheme.bits == target.qconfig.activation.scheme.bits for fq in acts.values())
    mq.calibrate(q, data, progress=False)
    assert all(fq.is_calibrated and bool(fq.quant_enabled) for fq in mq.quantizers(q).values())
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < 0.1, f"{backend}/{name}: relative max error {err:.3f}"
    assert err > 0  # quantization is really on


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_four_bit_weights_lose_more_than_eight(name: str) -> None:
    z = ZOO[name]
    model, data = z.build(), z.calibration_data(2, 8)
    errors = {}
    for bits in (8, 4):
        preset = mq.QConfigPreset(f"w{bits}a8-minmax", "min/max weights", weight_bits=bits, activation_bits=8)
        q = mq.prepare(model, "qdq", (data[0],), qconfig=preset)
        assert {fq.scheme.bits for fq in mq.quantizers(q, activations=False).values()} == {bits}
        mq.calibrate(q, data, progress=False)
        with torch.no_grad():
            errors[bits] = rel_err(q(data[0]), model(data[0]))
    assert errors[8] < errors[4] < 0.5


def test_unsupported_bit_width_is_refused_by_the_backend() -> None:
    backend_or_skip("tensorrt")
    z = ZOO["mlp_bn"]
    with pytest.raises(mq.SchemeError, match="cannot run W4A8"):
        mq.prepare(z.build(), "tensorrt", (z.inputs(),), qconfig="w4a8")
