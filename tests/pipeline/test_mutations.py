"""Mutation tests (issue 12, item 3): each exporter bug planted in a ResNet-18-shaped qdq export makes ``mq.verify``
FAIL and the report names the op at fault, while the unchanged export PASSes.

The bugs are planted with ``mq_core.testing.mutations`` inside the artifact, the manifest's checksums re-sealed and
its quantizer table left as exported, so only the artifact itself is wrong. Each check names the first tensor in
graph order whose local check breaks: the mutated tensor itself when its own Q/DQ is wrong, or, for a dropped Q/DQ
pair, the first quantized tensor whose op reads the dropped one (the dropped tensor has no check of its own).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mq_core as mq
from mq_core.testing import mutations
from mq_core.testing.zoo import resnet18

SIZE = 64  # the last stage is 2x2: its average pool makes exact rounding ties on power-of-two grids
MUTATED = "layers_3_conv1"  # block 4 of 8: its first conv (with its ReLU), mid-network
WEIGHT = "layers.3.conv1.weight"
RUN = ("onnx-qdq", "onnxruntime")


def _export(qconfig: str, out: Path) -> mq.ExportResult:
    example = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    qmodel = mq.prepare(resnet18(size=SIZE), "qdq", example, qconfig=qconfig)
    gen = torch.Generator().manual_seed(1)
    mq.calibrate(qmodel, [torch.randn(4, 3, SIZE, SIZE, generator=gen) for _ in range(2)], progress=False)
    return mq.export(qmodel, example, out)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    """Eight images: enough rows for the top-1 agreement of the logits to be judged."""
    return torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mq.ExportResult]:
    """W8A8 (float scales), W4A4 (integer Clips between Q and DQ) and W8A8 on power-of-two scales (where rounding
    ties are exact, so the rounding mode shows)."""
    root = tmp_path_factory.mktemp("mutations")
    return {qconfig: _export(qconfig, root / qconfig) for qconfig in ("w8a8", "w4a4", "w8a8-pot")}


def _verify(result: mq.ExportResult, out_dir: Path, inputs: torch.Tensor) -> mq.VerificationReport:
    """Verify the folder as a user would: loaded back (checksums checked), judged with the prepared model."""
    return mq.verify(mq.ExportResult.load(out_dir), inputs, runtimes=["onnxruntime"], qmodel=result.qmodel)


@pytest.fixture(scope="module")
def baselines(exports: dict[str, mq.ExportResult], inputs: torch.Tensor) -> dict[str, mq.VerificationReport]:
    return {qconfig: _verify(result, result.out_dir, inputs) for qconfig, result in exports.items()}


@pytest.mark.parametrize("qconfig", ["w8a8", "w8a8-pot", "w4a4"])
def test_the_unchanged_exports_pass(baselines: dict[str, mq.VerificationReport], qconfig: str) -> None:
    report = baselines[qconfig]
    assert report.layers is not None and report.layers.passed and report.first_broken() == {}, report.table(True)
    if qconfig != "w4a4":  # 4-bit grids drift further end to end than the documented 8-bit bounds allow
        assert report.passed, report.table()


@pytest.mark.parametrize("qconfig, mutate, expected, op", [
    ("w8a8", lambda out: mutations.scale_activation(out, MUTATED), MUTATED, None),
    ("w8a8", lambda out: mutations.shift_zero_point(out, MUTATED), MUTATED, None),
    ("w8a8", lambda out: mutations.per_tensor_weight(out, WEIGHT), MUTATED, None),
    ("w8a8", lambda out: mutations.drop_qdq(out, MUTATED), "layers_3_conv2", None),
    # the op whose output is quantized is now the rounding subgraph's last node
    ("w8a8-pot", lambda out: mutations.round_half_away(out, "avgpool"), "avgpool", "Cast avgpool_mutated_round_Cast"),
    ("w4a4", lambda out: mutations.drop_clip(out, MUTATED), MUTATED, None),
], ids=["scale x1.25", "zero point +1 in DQ", "per-tensor weight", "dropped Q/DQ", "round half away", "no 4-bit Clip"])
def test_each_mutation_fails_and_names_the_op_at_fault(
    exports: dict[str, mq.ExportResult], baselines: dict[str, mq.VerificationReport], inputs: torch.Tensor,
    tmp_path: Path, qconfig: str, mutate: Callable[[Path], str], expected: str, op: str | None,
) -> None:
    result = exports[qconfig]
    broken = mutations.copy_export(result, tmp_path / "export")
    mutate(broken.out_dir)
    report = _verify(result, broken.out_dir, inputs)
    assert not report.passed
    first = report.first_broken()[RUN]
    assert first.tensor == expected, report.table(True)
    assert first.op == (op or next(c.op for c in baselines[qconfig].layers.checks if c.tensor == expected))
    assert all(c.local_passed for c in report.layers.checks if c.position < first.position)  # upstream is intact
    assert report.to_dict()["layers"]["first_broken"][0]["tensor"] == expected


def test_a_dropped_pair_is_named_by_the_op_that_reads_it(
    exports: dict[str, mq.ExportResult], baselines: dict[str, mq.VerificationReport], inputs: torch.Tensor,
    tmp_path: Path,
) -> None:
    """The dropped tensor has no DequantizeLinear left to compare: the report says so, and the region of the op
    that read it now reaches back through the unquantized tensor to the quantized ones before it."""
    result = exports["w8a8"]
    before = {c.tensor: c for c in baselines["w8a8"].layers.checks}
    assert before["layers_3_conv2"].reads == [MUTATED]
    broken = mutations.copy_export(result, tmp_path / "export")
    mutations.drop_qdq(broken.out_dir, MUTATED)
    report = _verify(result, broken.out_dir, inputs)
    first = report.first_broken()[RUN]
    assert first.tensor == "layers_3_conv2" and first.reads == before[MUTATED].reads
    assert MUTATED not in {c.tensor for c in report.layers.checks}
    assert any(MUTATED in note for note in report.layers.notes)


def test_mutations_touch_only_the_artifact(exports: dict[str, mq.ExportResult],
                                           baselines: dict[str, mq.VerificationReport], tmp_path: Path) -> None:
    """The manifest's quantizer table stays as exported, its checksums match the mutated files, and without a
    tensor name a mutation picks the middle quantized activation in graph order."""
    result = exports["w8a8"]
    broken = mutations.copy_export(result, tmp_path / "export")
    assert broken.qmodel is result.qmodel
    tensor = mutations.scale_activation(broken)
    manifest = json.loads((broken.out_dir / "manifest.json").read_text())
    assert manifest["quantizers"] == result.manifest["quantizers"]
    assert manifest["files"] != result.manifest["files"]
    mq.ExportResult.load(broken.out_dir)  # checksums re-sealed
    activations = [c.tensor for c in baselines["w8a8"].layers.checks]  # graph order
    assert tensor == activations[:-1][len(activations[:-1]) // 2]  # the graph output is never the default


def test_a_mutation_that_has_nothing_to_edit_is_refused(exports: dict[str, mq.ExportResult], tmp_path: Path) -> None:
    broken = mutations.copy_export(exports["w8a8"], tmp_path / "export")
    with pytest.raises(mq.ConfigError, match="no activation with an integer grid Clip"):
        mutations.drop_clip(broken.out_dir)
    with pytest.raises(mq.ConfigError, match="'ghost'"):
        mutations.scale_activation(broken.out_dir, "ghost")
