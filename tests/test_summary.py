"""mq.summary: one row per quantizer with what it quantizes (from the placement), its grid and its state."""

from __future__ import annotations

import pytest

import mq_core as mq
from mq_core.testing.zoo import ZOO


def test_summary_lists_every_quantizer_with_placement_and_state() -> None:
    entry = ZOO["mobilenet"]
    qmodel = mq.prepare(entry.build(), "qdq", entry.inputs(2))
    found = mq.quantizers(qmodel)
    before = mq.summary(qmodel)
    weights = sum(fq.role == "weight" for fq in found.values())
    assert before.splitlines()[0] == (f"prepared for 'qdq' with qconfig 'qdq-default' (ptq); {weights} weight and "
                                      f"{len(found) - weights} activation quantizers, 0 calibrated")
    rows = before.splitlines()[3:]
    assert [row.split()[0] for row in rows] == list(found)
    assert all("uncalibrated" in row for row in rows)
    placements = {r["quantizer"]: r for r in qmodel.mq_info.placements[""]}
    for row in rows:
        name = row.split()[0]
        if name in placements:
            assert f"{placements[name]['tensor']}" in row and placements[name]["reason"] in row
        else:
            assert f"weight of {name.removesuffix('.weight_fake_quant')}" in row

    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    after = mq.summary(qmodel)
    assert f"{len(found)} calibrated" in after.splitlines()[0]
    assert "uncalibrated" not in after and "s=" in after
    assert "uint8 affine per-tensor" in after and " z=" in after  # the qdq backend's activations


def test_summary_of_an_unprepared_model_says_what_to_do() -> None:
    with pytest.raises(mq.ConfigError, match=r"call mq\.prepare"):
        mq.summary(ZOO["mlp_bn"].build())


@pytest.mark.parametrize("preset", ["w4a4-lsq", "w4a4-lsq-plus", "w4a4-pact", "w4a4-dsq", "w4a4-dorefa-pact"])
def test_summary_shows_the_deploy_qparams_of_learnable_quantizers(preset: str) -> None:
    entry = ZOO["resnet"]
    qmodel = mq.prepare(entry.build(), "qdq", entry.inputs(2), qconfig=preset, mode="qat")
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    text = mq.summary(qmodel)
    for name, fq in mq.quantizers(qmodel).items():
        row = next(line for line in text.splitlines() if line.split()[0] == name)
        if preset.startswith("w4a4-dorefa") and fq.role == "weight":  # exportable only after bake_dorefa
            assert "no fixed grid yet" in row, row
            continue
        scale, _ = fq.export_qparams()
        shown = f"s={scale.item():.4g}" if scale.numel() == 1 else f"s=[{scale.min():.3g}..{scale.max():.3g}]"
        assert shown in row and "int4" in row, row
