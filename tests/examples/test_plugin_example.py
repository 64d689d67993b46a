"""examples/mq_plugin_example, installed for real by pip: discovery, the conformance kit, and the fix-position file.

The distribution is copied out of the source tree (so no build/ or egg-info is left in the repository) and
installed with ``pip install --no-deps --no-build-isolation --target`` into a session site directory, which each
test puts on ``sys.path``: mq then finds it through its entry point exactly as it would a published plugin.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mq_core as mq
import mq_core.plugins
from mq_core.export.ranges import TensorQuant
from mq_core.testing.golden import TinyNet, set_qparams, tiny_inputs

PLUGIN_SOURCE = Path(__file__).resolve().parents[2] / "examples" / "mq_plugin_example"
DISTRIBUTION = "mq-plugin-example"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory holding mq-plugin-example, installed by pip (dist-info with its entry points and all)."""
    source = tmp_path_factory.mktemp("plugin-source") / PLUGIN_SOURCE.name
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, timeout=300,
    )
    return target


@pytest.fixture(autouse=True)
def installed(monkeypatch: pytest.MonkeyPatch, plugin_site: Path) -> Iterator[Path]:
    """The installed plugin on sys.path, with registries reloaded before and after the test."""
    for var in ("MQ_PLUGINS", "MQ_DISABLE_PLUGINS", "MQ_PREFER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(plugin_site))
    importlib.invalidate_caches()
    mq_core.plugins.reset()
    yield plugin_site
    mq_core.plugins.reset()


# --- discovery ------------------------------------------------------------------------------------------------


def test_backend_resolves_from_the_installed_distribution(installed: Path) -> None:
    backend = mq.get_backend("pot-npu")
    assert mq.get_backend("PotNPU") is backend  # aliases, case-insensitive
    entry = mq.get_entry("backend", "pot-npu")
    assert (entry.distribution, entry.version) == (DISTRIBUTION, "0.1.0")
    assert mq.get_entry("exporter", "pot-npu").distribution == DISTRIBUTION
    import mq_plugin_example

    assert Path(mq_plugin_example.__file__).is_relative_to(installed)  # the pip-installed copy, not the source
    summary = backend.summary()
    assert summary["weight"] == "int8 sym per-tensor narrow pot"
    assert summary["activation"] == "int8 sym per-tensor pot"
    assert summary["exporters"] == ["pot-npu", "qdq"] and summary["runtimes"] == ["onnxruntime"]
    record = next(r for r in mq_core.plugins.get_manager().records if r.distribution == DISTRIBUTION)
    assert record.status == "loaded", record.error


def test_backend_refuses_bit_widths_the_npu_cannot_run() -> None:
    with pytest.raises(mq.SchemeError, match="pot-npu"):
        mq.resolve_qconfig("pot-npu", "w4a4")


# --- the conformance kit, as a plugin author runs it ------------------------------------------------------------


@pytest.mark.parametrize("model", ["resnet", "mobilenet", "unet", "mlp_bn"])
def test_pot_npu_conforms_on_zoo_model(mq_conformance, tmp_path: Path, model: str) -> None:
    result = mq_conformance("pot-npu", model)
    assert result.passed, result.summary()
    assert set(result.reports) == {"pot-npu", "qdq"}
    for report in result.reports.values():
        assert not report.skipped, report.skipped
        assert all(c.runtime == "onnxruntime" and c.exact == 1.0 for c in report.checks), report.table()
    assert result.tensor_agreement and min(result.tensor_agreement.values()) >= 0.98, result.tensor_agreement

    # every quantized tensor of the export has a fix position, and 2^-p is exactly its simulated scale
    folder = tmp_path / f"pot-npu-{model}" / "pot-npu"
    tensors = {t["name"]: t for t in json.loads((folder / "model.fixpos.json").read_text())["tensors"]}
    manifest = json.loads((folder / "manifest.json").read_text())
    # a quantized network output is named after the graph output in the float ONNX ("fc" -> "output")
    renamed = {o["tensor"]: o["name"] for o in manifest["outputs"] if o["tensor"]}
    quantizers = {renamed.get(name, name): entry for name, entry in manifest["quantizers"].items()}
    assert quantizers and set(quantizers) <= set(tensors)
    for name, entry in quantizers.items():
        (scale,) = np.atleast_1d(entry["scale"])
        assert scale == 2.0 ** -tensors[name]["fix_pos"], (name, scale, tensors[name])
        assert tensors[name]["kind"] == entry["kind"]
        assert tensors[name]["narrow_range"] == (entry["kind"] == "weight")


# --- golden: a tiny model with power-of-two scales set by hand ---------------------------------------------------


#: fix position of every quantizer (scale 2^-p, zero point 0)
HAND_FIX_POS = {"x_fq": 5, "conv.weight_fake_quant": 7, "conv_fq": 4, "fc.weight_fake_quant": 6, "fc_fq": 3}

#: the expected file, in graph order: the conv output (conv2d) takes the merged ReLU's (conv) fix position, the
#: flatten output (view) keeps it, the quantized network output is listed under the graph output's name; weights
#: are narrow-range, activations full-range int8.
GOLDEN = {
    "format": "mq-pot-npu-fixpos/1",
    "tensors": [
        {"bit_width": 8, "fix_pos": 5, "kind": "activation", "name": "x", "narrow_range": False},
        {"bit_width": 8, "fix_pos": 7, "kind": "weight", "name": "conv.weight", "narrow_range": True},
        {"bit_width": 8, "fix_pos": 4, "kind": "activation", "name": "conv2d", "narrow_range": False},
        {"bit_width": 8, "fix_pos": 4, "kind": "activation", "name": "conv", "narrow_range": False},
        {"bit_width": 8, "fix_pos": 4, "kind": "activation", "name": "view", "narrow_range": False},
        {"bit_width": 8, "fix_pos": 6, "kind": "weight", "name": "fc.weight", "narrow_range": True},
        {"bit_width": 8, "fix_pos": 3, "kind": "activation", "name": "output", "narrow_range": False},
    ],
}


def _calibrated_tiny(fix_pos: dict[str, int]) -> nn.Module:
    torch.manual_seed(0)
    qmodel = mq.prepare(TinyNet().eval(), "pot-npu", tiny_inputs(batch=4))
    mq.calibrate(qmodel, [tiny_inputs(batch=4)], progress=False)
    assert set(mq.quantizers(qmodel)) == set(fix_pos)
    set_qparams(qmodel, {name: (2.0 ** -p, 0) for name, p in fix_pos.items()})
    return qmodel


def test_golden_fixpos_file(tmp_path: Path) -> None:
    result = mq.export(_calibrated_tiny(HAND_FIX_POS), tiny_inputs(batch=4), tmp_path / "out")
    assert result.exporter == "pot-npu"
    assert {a.path.name for a in result.artifacts} == {"model.float.onnx", "model.fixpos.json"}
    assert json.loads(result.path("fixpos").read_text()) == GOLDEN

    # read back as written: scales 2^-p exactly, zero point 0, int8 grids
    (runnable,) = mq.get_exporter("pot-npu").runnables(result)
    from mq_plugin_example.fixpos import read_fixpos

    table = read_fixpos(result.path("fixpos"))
    assert [table[t["name"]].scale.item() for t in GOLDEN["tensors"]] == [2.0 ** -t["fix_pos"]
                                                                         for t in GOLDEN["tensors"]]
    assert (table["fc.weight"].qmin, table["fc.weight"].qmax, table["x"].qmin) == (-127, 127, -128)
    assert {i.name for i in runnable.model.graph.initializer} >= {"conv.weight_mq_codes", "fc.weight_mq_codes"}

    report = mq.verify(result, tiny_inputs(batch=4))
    assert report.passed and all(c.exact == 1.0 for c in report.checks), report.table()


def test_a_scale_that_is_not_a_power_of_two_is_refused(tmp_path: Path) -> None:
    qmodel = _calibrated_tiny(HAND_FIX_POS)
    mq.quantizers(qmodel)["conv_fq"].set_qparams(torch.tensor(0.05), torch.tensor(0))
    out = tmp_path / "out"
    with pytest.raises(mq.ExportError, match="not a power of two"):
        mq.export(qmodel, tiny_inputs(batch=4), out)
    assert not out.exists() or not any(out.rglob("*"))  # staged: nothing is left behind


def _entry(**grid: object) -> TensorQuant:
    values = {"scale": np.asarray(0.25, np.float32), "zero_point": np.asarray(0), "qmin": -128, "qmax": 127,
              "bits": 8, "signed": True, "symmetric": True, **grid}
    return TensorQuant(name="t", kind="activation", **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale, expected", [(1.0, 0), (0.25, 2), (4.0, -2), (2.0 ** -23, 23), (2.0 ** -126, 126)])
def test_fix_position_of_powers_of_two(scale: float, expected: int) -> None:
    from mq_plugin_example.fixpos import fix_position

    assert fix_position(_entry(scale=np.asarray(scale, np.float32))) == expected


@pytest.mark.parametrize("grid, message", [
    ({"scale": np.asarray(0.3, np.float32)}, "not a power of two"),
    ({"scale": np.nextafter(np.float32(0.25), np.float32(1))}, "not a power of two"),
    ({"scale": np.asarray([0.5, 0.25], np.float32), "zero_point": np.zeros(2), "axis": 0}, "per channel"),
    ({"zero_point": np.asarray(3), "symmetric": False}, "asymmetric"),
    ({"qmin": 0, "qmax": 255, "signed": False, "zero_point": np.asarray(0)}, "unsigned"),
])
def test_grids_the_npu_cannot_hold_raise_export_error(grid: dict, message: str) -> None:
    from mq_plugin_example.fixpos import format_fixpos

    with pytest.raises(mq.ExportError, match=message):
        format_fixpos([_entry(**grid)])


@pytest.mark.parametrize("data, message", [
    ({"format": "other"}, "not a pot-npu fix-position file"),
    ({"format": "mq-pot-npu-fixpos/1", "tensors": {}}, "must be a list"),
    ({"format": "mq-pot-npu-fixpos/1", "tensors": [{"name": "a", "kind": "activation", "bit_width": 8,
                                                    "fix_pos": 2.5, "narrow_range": False}]}, "fix_pos"),
    ({"format": "mq-pot-npu-fixpos/1", "tensors": [{"name": "a", "kind": "activation", "bit_width": 8,
                                                    "fix_pos": True, "narrow_range": False}]}, "fix_pos"),
    ({"format": "mq-pot-npu-fixpos/1", "tensors": [{"name": "a", "kind": "bias", "bit_width": 8,
                                                    "fix_pos": 1, "narrow_range": False}]}, "kind"),
    ({"format": "mq-pot-npu-fixpos/1", "tensors": [{"name": "a", "kind": "weight", "bit_width": 8,
                                                    "fix_pos": 300, "narrow_range": True}]}, "-127 to 126"),
    ({"format": "mq-pot-npu-fixpos/1", "tensors": 2 * [{"name": "a", "kind": "weight", "bit_width": 8,
                                                        "fix_pos": 1, "narrow_range": True}]}, "twice"),
])
def test_malformed_files_raise_config_error(data: dict, message: str) -> None:
    from mq_plugin_example.fixpos import parse_fixpos

    with pytest.raises(mq.ConfigError, match=message):
        parse_fixpos(data)
