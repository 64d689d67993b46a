"""Verification inputs keep their dtypes (int64 token ids reach the runtimes as int64), and `mq verify --inputs`
of the wrong shape or kind is one clear error before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import assert_clean_error, invoke
from torch import nn

import mq_core as mq


class TokenClassifier(nn.Module):
    """Token ids [N, 7] (int64) -> embedding -> mean over tokens -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(ids).mean(1))


def token_ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (batch, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[mq.ExportResult, Path]:
    """The token model prepared for qdq, exported, and its checkpoint (recording int64 inputs [N, 7])."""
    ids = token_ids(4, 0)
    qmodel = mq.prepare(TokenClassifier().eval(), "qdq", ids)
    mq.calibrate(qmodel, [token_ids(8, seed) for seed in range(1, 4)], progress=False)
    root = tmp_path_factory.mktemp("tokens")
    checkpoint = mq.save_checkpoint(qmodel, root / "qmodel.pt", ids, model_ref=f"{__name__}:TokenClassifier")
    return mq.export(qmodel, ids, root / "export"), checkpoint


def test_int64_token_ids_reach_the_runtimes_as_int64(exported: tuple[mq.ExportResult, Path]) -> None:
    result, _ = exported
    ids = token_ids(5, 9)
    report = mq.verify(result, ids, runtimes=["onnxruntime", "openvino"])
    assert report.passed and report.failures == [], report.table()
    assert {c.runtime for c in report.checks} == {"onnxruntime", "openvino"}
    assert all(c.exact == 1.0 for c in report.checks if c.runtime == "onnxruntime")
    # RuntimeModule (deployed accuracy, the examples) feeds the same way
    deployed = mq.RuntimeModule(result.qdq_model, "onnxruntime")(ids)
    with torch.no_grad():
        assert torch.equal(deployed, result.qmodel.eval()(ids))


def test_mq_verify_inputs_of_the_wrong_shape_or_kind_are_one_clear_error(
        exported: tuple[mq.ExportResult, Path], tmp_path: Path) -> None:
    result, checkpoint = exported
    args = ["verify", str(result.out_dir), "--checkpoint", str(checkpoint), "--model", f"{__name__}:TokenClassifier",
            "--runtime", "onnxruntime", "--inputs"]
    torch.save(token_ids(3, 1)[:, :5], tmp_path / "short.pt")
    assert_clean_error(invoke(*args, str(tmp_path / "short.pt")),
                       "has shape [3, 5], but the checkpoint's model takes 1 input(s): [N, 7] int64 (any batch size N)")
    torch.save(token_ids(3, 1).float(), tmp_path / "floats.pt")
    assert_clean_error(invoke(*args, str(tmp_path / "floats.pt")), "holds torch.float32 values", "[N, 7] int64")
    torch.save((token_ids(3, 1), token_ids(3, 2)), tmp_path / "two.pt")
    assert_clean_error(invoke(*args, str(tmp_path / "two.pt")), "holds 2 tensors", "takes 1 input(s)")
    # numpy's default int64 ids (any batch size) verify
    np.save(tmp_path / "ids.npy", token_ids(6, 3).numpy())
    verified = invoke(*args, str(tmp_path / "ids.npy"))
    assert verified.exit_code == 0 and "PASS" in verified.output, verified.output
