"""Issue 15, item 2 (by hand): per-layer qconfigs, ``prepare(..., qconfig={"block1": "w8a8", "*": "w4a8"})``, in
Python, in a checkpoint and in the TOML of ``mq quantize``; the matching and ownership rules; the errors."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.demo import digits
from mq_core.testing.zoo import MLPBN

pytestmark = pytest.mark.usefixtures("deterministic")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return digits.DigitsResNet().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def weight_bits(qmodel: torch.nn.Module) -> dict[str, int]:
    return {n.removesuffix(".weight_fake_quant"): fq.scheme.bits
            for n, fq in mq.quantizers(qmodel, activations=False).items()}


def activation_bits(qmodel: torch.nn.Module) -> dict[str, int]:
    return {n: fq.scheme.bits for n, fq in mq.quantizers(qmodel, weights=False).items()}


def test_a_subtree_gets_its_qconfig_the_rest_the_default_and_a_float_layer_no_quantizer(model, x) -> None:
    qmodel = mq.prepare(model, "qdq", x, qconfig={"block1": "w8a8", "*": "w4a8", "head.2": "float"})
    assert weight_bits(qmodel) == {"stem.0": 4, "block1.conv1": 8, "block1.conv2": 8, "block2.conv1": 4,
                                   "block2.conv2": 4}
    assert type(qmodel.get_submodule("head.2")) is torch.nn.Linear  # left float: not swapped, no quantizer
    assert not any(fq.layer == "head.2" for fq in mq.quantizers(qmodel).values())
    assert "head_2_fq" not in activation_bits(qmodel)
    # a float classifier does not make the layers before it float (qdq places for ONNX Runtime's integer readers)
    assert {"block1_conv2_fq", "block2_conv2_fq", "relu_3_fq"} <= set(activation_bits(qmodel))
    # the residual join inside block1 (a function, no module of its own) is in block1's sub-tree
    assert mq.quantizers(qmodel)["relu_1_fq"].layer == "relu_1"
    assert qmodel.mq_info.qconfig_name == "*: w4a8, block1: w8a8, head.2: float"
    mq.calibrate(qmodel, [x], progress=False)
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all()


def test_the_most_specific_pattern_wins_and_activations_follow_their_producer(model, x) -> None:
    qmodel = mq.prepare(model, "qdq", x, qconfig={"*": "w4a4", "block1": "w8a8", "block1.conv2": "w4a4",
                                                  "block?.conv1": "w2a4", "stem.0": "w8a8"})
    assert weight_bits(qmodel) == {"stem.0": 8, "block1.conv1": 2, "block1.conv2": 4, "block2.conv1": 2,
                                   "block2.conv2": 4, "head.2": 4}
    acts = activation_bits(qmodel)
    assert acts["x_fq"] == 8  # a network input follows its consumer, stem.0
    assert acts["stem_0_fq"] == 8 and acts["block1_conv2_fq"] == 4 and acts["block2_conv1_fq"] == 4
    assert acts["relu_1_fq"] == 8 and acts["relu_3_fq"] == 4  # block1's join follows block1; block2's the default
    owners = {n: fq.layer for n, fq in mq.quantizers(qmodel).items()}
    assert owners["x_fq"] == owners["stem_0_fq"] == "stem.0"


def test_checkpoint_round_trips_a_mixed_model(model, x, tmp_path: Path) -> None:
    qmodel = mq.calibrate(mq.prepare(model, "qdq", x, qconfig={"block2": "w8a8", "*": "w4a4", "stem": "float"}),
                          [x], progress=False)
    mq.save_checkpoint(qmodel, tmp_path / "q.pt", x)
    restored = mq.restore(digits.DigitsResNet(), mq.load_checkpoint(tmp_path / "q.pt"))
    assert weight_bits(restored) == weight_bits(qmodel) == {"block1.conv1": 4, "block1.conv2": 4,
                                                            "block2.conv1": 8, "block2.conv2": 8, "head.2": 4}
    assert activation_bits(restored) == activation_bits(qmodel)
    assert restored.mq_info.layer_qconfigs.keys() == {"block2", "*", "stem"}
    with torch.no_grad():
        assert torch.equal(restored(x), qmodel(x))


def test_a_pattern_matching_nothing_names_the_close_names(model, x) -> None:
    with pytest.raises(mq.ConfigError, match=r"'blok1' matches no module.*close names: 'block1'"):
        mq.prepare(model, "qdq", x, qconfig={"blok1": "w8a8", "*": "w4a8"})
    with pytest.raises(mq.ConfigError, match="must be a preset name"):
        mq.prepare(model, "qdq", x, qconfig={"block1": 8})


def test_bits_the_target_cannot_run_are_refused_naming_the_layer(model, x) -> None:
    with pytest.raises(mq.SchemeError, match=r"qconfig for layer 'block1':.*'tensorrt' cannot run W4A8"):
        mq.prepare(model, "tensorrt", x, qconfig={"block1": "w4a8"})
    qmodel = mq.prepare(model, "tensorrt", x, qconfig={"block1": "float"})  # float is always allowed
    assert "block1.conv1" not in weight_bits(qmodel) and weight_bits(qmodel)["stem.0"] == 8


USER_MODULE = """
import torch
from mq_core.testing.zoo import MLPBN


def build():
    torch.manual_seed(0)
    return MLPBN()
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "usermodel.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermodel", None)
    torch.save(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "calib.pt")
    return tmp_path


def test_toml_qconfig_table_quantizes_per_layer_and_mq_export_rebuilds_it(workdir: Path) -> None:
    (workdir / "q.toml").write_text(textwrap.dedent("""
        [quantize]
        model = "usermodel:build"
        calib = "calib.pt"
        out = "out"
        report = false

        [quantize.qconfig]
        "*" = "w4a8"
        "net.3" = "w8a8"
        "net.6" = "float"
    """))
    result = CliRunner().invoke(cli, ["quantize", "--config", "q.toml", "--json"])
    assert result.exit_code == 0, result.output
    (backend,) = json.loads(result.output)["backends"]
    assert backend["qconfig"] == "*: w4a8, net.3: w8a8, net.6: float" and backend["passed"]
    checkpoint = mq.load_checkpoint(backend["checkpoint"])
    restored = mq.restore(MLPBN(), checkpoint)
    assert weight_bits(restored) == {"net.0": 4, "net.3": 8}
    exported = CliRunner().invoke(cli, ["export", backend["checkpoint"], "--model", "usermodel:build", "-q"])
    assert exported.exit_code == 0, exported.output

    (workdir / "bad.toml").write_text('[qconfig]\n"net.9" = "w8a8"\n')
    bad = CliRunner().invoke(cli, ["quantize", "--config", "bad.toml", "--model", "usermodel:build", "--calib",
                                   "calib.pt", "--out", "bad"])
    assert bad.exit_code == 2 and "'net.9' matches no module" in bad.output and "Traceback" not in bad.output
    (workdir / "bad.toml").write_text('[qconfig]\n"net.0" = 8\n')
    bad = CliRunner().invoke(cli, ["quantize", "--config", "bad.toml"])
    assert bad.exit_code == 2 and "qconfig.net.0 = 8 must be a preset name" in bad.output
