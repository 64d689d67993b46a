"""The conformance kit fails broken observers that runtimes reproduce exactly (issue 10, point 20).

An observer handing out ranges of +-1e-3 saturates every activation; the exported model saturates the same way,
so outputs agree 100% and the kit used to pass it. It now also bounds the simulation's distance to the float
model and checks every quantizer's qparams against the backend's grids. (Every real backend passes both: the
backend matrix and the example plugin's tests run the kit on the whole zoo.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import mq_core as mq
from mq_core import Backend
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.testing.conformance import grid_problems, run_zoo_conformance
from mq_core.testing.golden import TinyNet, set_qparams, tiny_inputs

pytestmark = pytest.mark.usefixtures("deterministic")


class SaturatingObserver(MinMaxObserver):
    """Broken on purpose: whatever it sees, the range is [-1e-3, 1e-3]."""

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().compute_range()
        return torch.full_like(lo, -1e-3), torch.full_like(hi, 1e-3)


class OffsetObserver(MinMaxObserver):
    """Broken on purpose: a zero point of 2 whatever the grid (wrong on a symmetric one)."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = super().calculate_qparams()
        return scale, torch.full_like(zero_point, 2)


def with_observer(backend: str, observer: type, role: str) -> Backend:
    """The backend with ``observer`` (a class, as a plugin would register it) for its weights or activations;
    same name, so export finds the backend's own exporters."""
    base = mq.get_backend(backend)
    spec = getattr(base.qconfig, role).replace(observer=observer)
    return dataclasses.replace(base, qconfig=dataclasses.replace(base.qconfig, **{role: spec}))


def test_saturating_observer_fails_although_runtimes_agree(tmp_path: Path) -> None:
    result = run_zoo_conformance(with_observer("qdq", SaturatingObserver, "activation"), "mlp_bn", tmp_path,
                                 runtimes=["onnxruntime"])
    assert all(report.passed for report in result.reports.values())  # the artifact reproduces the saturation
    assert min(result.tensor_agreement.values()) == 1.0
    assert not result.passed
    assert result.float_error["output"] > 0.9
    assert any("away from the float model" in p for p in result.problems), result.problems
    assert "problem: output output of the simulation" in result.summary()


def test_zero_point_on_a_symmetric_grid_fails(tmp_path: Path) -> None:
    result = run_zoo_conformance(with_observer("qdq", OffsetObserver, "weight"), "mlp_bn", tmp_path,
                                 runtimes=["onnxruntime"], max_float_error=float("inf"))
    assert not result.passed
    assert any("zero point other than 0 on a symmetric grid" in p for p in result.problems), result.problems


def test_a_scale_off_a_power_of_two_grid_is_listed() -> None:
    backend = mq.get_backend("qdq")
    qconfig = mq.resolve_qconfig(backend, "w8a8-pot")
    qmodel = mq.prepare(TinyNet().eval(), backend, tiny_inputs(batch=4), qconfig=qconfig)
    mq.calibrate(qmodel, [tiny_inputs(batch=4)], progress=False)
    assert grid_problems(qmodel, qconfig) == []  # calibrated by the backend's own observers: on the grid
    set_qparams(qmodel, {"conv_fq": (0.3, 0)})
    (problem,) = grid_problems(qmodel, qconfig)
    assert "conv_fq" in problem and "not a power of two" in problem
    # a grid that is not the backend's: the default (non power-of-two) qconfig's quantizers on a pot backend
    plain = mq.prepare(TinyNet().eval(), backend, tiny_inputs(batch=4))
    mq.calibrate(plain, [tiny_inputs(batch=4)], progress=False)
    assert all("the backend's" in p for p in grid_problems(plain, qconfig))
    assert len(grid_problems(plain, qconfig)) == len(mq.quantizers(plain))
