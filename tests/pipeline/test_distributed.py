"""Calibration and QAT across torch.distributed ranks: 2 gloo ranks on CPU, launched with torchrun.

The test runs this file as a torchrun script (``_worker``): each rank writes what it measured to a JSON file and the
test compares. (a) Synced calibration on disjoint shards against one process calibrating on their union (the shards
concatenated in rank order), for every built-in observer and the mq-algos LSQ observer. (b) Two steps of
DistributedDataParallel W4A4 LSQ QAT on half batches against the same steps of one process on the full batches,
then a checkpoint written by rank 0 and restored on every rank. (c) PTQ methods streaming a DistributedSampler's
shard on each rank (``cle,bias_correction``; ``adaround`` with every step on the whole shard) against one process
on the whole data set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import mq_core as mq
from mq_core.demo.digits import DigitsCNN
from mq_core.plugin_api import QATModule, quantize
from mq_core.quant.observers import MinMaxObserver

#: Activation observers compared, and the relative tolerance of synced against single-process qparams. minmax is
#: exact by construction; the others merge sums, means or EMAs whose float rounding differs from one process's
#: (docs/algorithms.md, "Distributed calibration and QAT"). kl's histogram is re-binned once onto the common range
#: instead of as the range grew, which moves its threshold by at most a few of its 2048 bins.
OBSERVERS = {"minmax": 0.0, "ema_minmax": 1e-5, "percentile": 1e-5, "mse": 1e-5, "clip_std": 1e-6, "lsq": 1e-6,
             "kl": 5e-3}
BATCHES, BATCH = 8, 8
#: Each parameter after a QAT step on 2 ranks differs from one process's by at most this fraction of how far the step
#: moved it: float32 rounding of sums taken in another order (measured: about 1e-5). The LSQ activation step size's
#: gradient scale counted only the local half batch before (N too small by 2), an error of sqrt(2) - 1 = 0.41 there.
QAT_RTOL = 1e-4
#: Synced PTQ against one process on the union: CLE's statistics (min/max) are exact, bias correction's float64 sums
#: differ only in their order, so states agree to float32 rounding.
PTQ_ATOL = 1e-5
#: AdaRound's rounding codes that may differ between 2 synced ranks and one process: its gradients are averaged in
#: another order, and a weight whose gradient is at rounding level can take the other code (measured: none).
ADAROUND_CODES = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_calibrate_and_train_like_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for name, rtol in OBSERVERS.items():
        synced = [torch.tensor(r["calibration"][name]["synced"]) for r in ranks]
        single = torch.tensor(ranks[0]["calibration"][name]["single"])
        local = torch.tensor(ranks[0]["calibration"][name]["local"])
        assert torch.equal(synced[0], synced[1]), name  # every rank freezes the same qparams
        assert not torch.equal(local, single), name  # rank 0's shard alone calibrates differently
        if rtol == 0:
            assert torch.equal(synced[0], single), name
        else:
            torch.testing.assert_close(synced[0], single, rtol=rtol, atol=0, msg=name)
    for r in ranks:  # a rank that saw no data takes the merged statistics of the one that did
        assert r["unobserved_rank"] == ranks[0]["unobserved_rank"]

    for r in ranks:  # (c) PTQ on shards
        assert r["ptq"]["cle_diff"] <= PTQ_ATOL, r["ptq"]
        assert r["ptq"]["adaround_codes_differ"] <= ADAROUND_CODES, r["ptq"]
        assert r["ptq"]["adaround_local_differs"], r["ptq"]  # a rank on its shard alone learns other rounding
    assert ranks[0]["ptq"]["states"] == ranks[1]["ptq"]["states"]  # every rank ends with the same model

    for r in ranks:
        assert r["losses_equal"]
        for step in r["qat_diff"]:
            worst = max(zip(step, r["names"]))
            assert worst[0] <= QAT_RTOL, worst
        assert min(r["moved"]) > 0  # the steps changed every learnable quantizer parameter
        assert r["restored_equal"]


# ----------------------------------------------------------------------------------------------------------------
# the torchrun worker


def _qparams(qmodel: torch.nn.Module) -> list[float]:
    return [float(v) for fq in mq.quantizers(qmodel, weights=False).values() for v in fq.scale.flatten()]


def _with_observer(observer: str) -> mq.QConfig:
    base = mq.get_backend("qdq").qconfig
    return dataclasses.replace(base, activation=base.activation.replace(observer=observer), name=observer)


def _calibration(rank: int, world: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    # batches of different spread, so each shard alone gives other ranges than the union
    batches = [torch.randn(BATCH, 1, 8, 8, generator=gen) * (1 + i) for i in range(BATCHES)]
    shard = batches[rank * BATCHES // world:(rank + 1) * BATCHES // world]
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    out = {}
    for name in OBSERVERS:
        qconfig = _with_observer(name)
        results = {}
        for label, data, sync in (("synced", shard, True), ("single", batches, False), ("local", shard, False)):
            qmodel = mq.prepare(copy.deepcopy(model), "qdq", batches[0], qconfig=qconfig)
            mq.calibrate(qmodel, data, progress=False, sync=sync)
            results[label] = _qparams(qmodel)
        out[name] = results
    return out


def _unobserved_rank(rank: int) -> list[float]:
    """Per-channel min/max where only rank 0 observes: rank 1 takes rank 0's shapes and values."""
    observer = MinMaxObserver(mq.get_backend("qdq").qconfig.weight.scheme)
    if rank == 0:
        observer(torch.arange(24.0).reshape(4, 6))
    observer.sync()
    return [*observer.min_val.tolist(), *observer.max_val.tolist(), int(observer.num_batches)]


def _qat(rank: int, world: int, out_dir: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    steps = [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(2)]
    calib = [torch.randn(8, 1, 8, 8, generator=gen) for _ in range(4)]
    torch.manual_seed(0)
    model = DigitsCNN()
    qmodel = mq.prepare(copy.deepcopy(model), "qdq", calib[0], qconfig="w4a4-lsq", mode="qat")
    mq.calibrate(qmodel, calib[rank::world], progress=False)
    mq.freeze_bn(qmodel)  # BN statistics of half a batch are not the full batch's (SyncBatchNorm needs a GPU)
    reference = copy.deepcopy(qmodel).train()
    ddp = DistributedDataParallel(qmodel.train())
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    losses_equal = True
    diffs: list[list[float]] = []
    share = 16 // world
    names = [n for n, _ in reference.named_parameters()]
    for x, y in steps:
        part = slice(rank * share, (rank + 1) * share)
        loss = F.cross_entropy(ddp(x[part]), y[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference_loss = F.cross_entropy(reference(x), y)
        reference_optimizer.zero_grad()
        reference_loss.backward()
        reference_optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses_equal &= bool(torch.isclose(total / world, reference_loss.detach(), rtol=1e-5))
        trained = dict(ddp.module.named_parameters())
        # each parameter's difference from one process's, relative to how far that process moved it
        diffs.append([float((trained[n] - p).abs().max() / (p - before[n]).abs().max())
                      for n, p in reference.named_parameters()])
    moved = [float((trained[n] - p).abs().max()) for n, p in before.items() if n.endswith("fq.scale")]

    path = out_dir / "qat.pt"
    if rank == 0:
        mq.save_checkpoint(ddp.module, path, calib[0])
    dist.barrier()
    restored = mq.restore(copy.deepcopy(model), mq.load_checkpoint(path))
    state, expected = restored.state_dict(), ddp.module.state_dict()
    restored_equal = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    return {"names": names, "qat_diff": diffs, "moved": moved, "losses_equal": losses_equal,
            "restored_equal": restored_equal}


def _ptq(rank: int, world: int) -> dict[str, Any]:
    """Synced PTQ on this rank's DistributedSampler shard against one process on all 64 samples."""
    gen = torch.Generator().manual_seed(2)
    dataset = TensorDataset(torch.rand(64, 1, 8, 8, generator=gen) * 2)
    shard = DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, shuffle=False))
    union = DataLoader(dataset, batch_size=8)
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    qconfig = _with_observer("minmax")

    def run(method: str, data: DataLoader, sync: bool, calibrated: bool, **options: Any) -> torch.nn.Module:
        qmodel = mq.prepare(copy.deepcopy(model), "qdq", torch.rand(8, 1, 8, 8), qconfig=qconfig)
        if calibrated:  # the same qparams everywhere: calibrated on the union by each process alone
            mq.calibrate(qmodel, union, progress=False, sync=False)
        return mq.ptq(qmodel, method, data, progress=False, sync=sync, **options)

    out: dict[str, Any] = {}
    synced = run("cle,bias_correction", shard, True, False)
    single = run("cle,bias_correction", union, False, False)
    out["cle_diff"] = max(float((a - b).abs().max()) for a, b in zip(synced.state_dict().values(),
                                                                      single.state_dict().values()))
    # batch_size above the data size: every step takes the whole shard (the whole data set for one process), so the
    # averaged gradient is one process's up to summation order
    options = {"iterations": 20, "batch_size": 64}
    adaround = run("adaround", shard, True, True, **options)
    reference = run("adaround", union, False, True, **options)
    local = run("adaround", shard, False, True, **options)

    def codes(qmodel: torch.nn.Module) -> torch.Tensor:
        """Every weight's integer code, as the deployed model stores it."""
        found = []
        for layer in qmodel.modules():
            if isinstance(layer, QATModule):
                fq, weight = layer.weight_fake_quant, layer.deploy_weight_and_bias()[0].detach()
                found.append(quantize(weight, fq.scale, fq.zero_point, fq.scheme.qmin, fq.scheme.qmax,
                                      fq.ch_axis).flatten())
        return torch.cat(found)

    out["adaround_codes_differ"] = float((codes(adaround) != codes(reference)).float().mean())
    out["adaround_local_differs"] = not torch.equal(codes(local), codes(reference))
    out["states"] = [float(v.double().sum()) for v in [*synced.state_dict().values(), *adaround.state_dict().values()]
                     if v.is_floating_point()]
    return out


def _worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        report = {"calibration": _calibration(rank, world), "unobserved_rank": _unobserved_rank(rank),
                  "ptq": _ptq(rank, world), **_qat(rank, world, out_dir)}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
