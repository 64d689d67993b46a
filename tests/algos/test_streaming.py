"""Calibration and every PTQ method stream their data: a DataLoader with a DistributedSampler is read batch by batch,
one pass after another, and no batch outlives its turn (issue 16, item 3).

``Tracked`` is a map-style dataset that records every sample index it serves and, through weak references to the
batches its ``collate`` makes, how many batches are alive at each read: a method that held the data set (the old
``list(batches)``, or bias correction's concatenation of all activations) keeps every batch alive at once.
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import mq_core as mq
from mq_core.demo.digits import DigitsCNN
from mq_core.plugin_api import QATBnModule, QATModule, disable_all
from mq_core.testing.zoo import ZOO

pytest.importorskip("mq_algos")

SAMPLES, BATCH = 64, 4
#: Batches alive at once while reading: the one being consumed and the one the loop variable still holds.
MAX_ALIVE = 2


class Tracked(Dataset):
    """Digits-shaped samples that record their reads and the batches alive at each read."""

    def __init__(self, n: int) -> None:
        self.x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.reads: list[int] = []
        self.batches: list[weakref.ref] = []
        self.most_alive = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads.append(index)
        self.most_alive = max(self.most_alive, self.alive())
        return self.x[index]

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.batches)

    def collate(self, samples: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(samples)
        self.batches.append(weakref.ref(batch))
        return batch


def _loader(dataset: Tracked) -> DataLoader:
    """Rank 0 of 2 (no process group needed): every other sample, in order."""
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=dataset.collate)


@pytest.fixture(scope="module")
def prepared() -> nn.Module:
    torch.manual_seed(0)
    return mq.prepare(DigitsCNN().eval(), "qdq", torch.rand(BATCH, 1, 8, 8))


@pytest.mark.parametrize("method", [None, "bias_correction", "cle", "adaround", "brecq", "qdrop"])
def test_a_distributed_sampler_shard_is_streamed_batch_by_batch(prepared: nn.Module, method: str | None) -> None:
    qmodel = copy.deepcopy(prepared)
    dataset = Tracked(SAMPLES)
    shard = list(range(0, SAMPLES, 2))
    mq.calibrate(qmodel, _loader(dataset), progress=False)
    reads = dataset.reads
    if method is not None:
        dataset.reads = []
        options: dict[str, Any] = {"iterations": 2} if method in ("adaround", "brecq", "qdrop") else {}
        mq.ptq(qmodel, method, _loader(dataset), progress=False, **options)
        assert dataset.reads[:BATCH] == shard[:BATCH]  # mq.ptq first reads one batch to check the data
        reads = dataset.reads[BATCH:]
    passes, rest = divmod(len(reads), len(shard))
    assert rest == 0 and passes >= 1 and reads == shard * passes  # whole passes over rank 0's shard only
    assert dataset.most_alive <= MAX_ALIVE, dataset.most_alive
    gc.collect()
    assert dataset.alive() == 0  # nothing kept a batch


def test_ptq_refuses_a_one_shot_generator(prepared: nn.Module) -> None:
    qmodel = mq.calibrate(copy.deepcopy(prepared), torch.rand(8, 1, 8, 8), progress=False)
    with pytest.raises(mq.CalibrationError, match="one-shot iterator"):
        mq.ptq(qmodel, "bias_correction", (x for x in torch.rand(2, 4, 1, 8, 8)), progress=False)


def _bias(layer: nn.Module) -> torch.Tensor:
    return layer.bn.bias if isinstance(layer, QATBnModule) else layer.bias


def _whole_data_correction(qmodel: nn.Module, x: torch.Tensor) -> None:
    """The reference: each layer in the order they run, its mean pre-activation on all of ``x`` at once, quantized
    (with the layers before it corrected) against float, subtracted from its bias."""
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    order: list[str] = []
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QATModule) and _bias(m) is not None}

    def preactivation(model: nn.Module, name: str) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        module = model.get_submodule(name)
        handle = (module.act.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) if module.act is not None
                  else module.register_forward_hook(lambda _m, _a, out: seen.append(out)))
        with torch.no_grad():
            model(x)
        handle.remove()
        return seen[0].transpose(0, 1).flatten(1).double().mean(1)

    handles = [m.register_forward_hook(lambda _m, _a, _o, n=n: order.append(n)) for n, m in layers.items()]
    with torch.no_grad():
        qmodel(x)
    for handle in handles:
        handle.remove()
    for name in order:
        delta = preactivation(qmodel, name) - preactivation(fp, name)
        with torch.no_grad():
            _bias(layers[name]).sub_(delta.float())


def test_streamed_bias_correction_equals_the_whole_data_correction() -> None:
    """Batches of 5 (the last one short) streamed through running sums give the corrections of the whole data set
    held at once, to float rounding."""
    x = ZOO["mobilenet"].inputs(32) * 2
    qmodel = mq.prepare(ZOO["mobilenet"].build(), "qdq", example_inputs=(x[:1],), qconfig="w4a8")
    mq.calibrate(qmodel, x, progress=False)
    qmodel.eval()
    before = {n: _bias(m).detach().clone() for n, m in qmodel.named_modules()
              if isinstance(m, QATModule) and _bias(m) is not None}
    reference = copy.deepcopy(qmodel)
    _whole_data_correction(reference, x)
    mq.ptq(qmodel, "bias_correction", DataLoader(TensorDataset(x), batch_size=5), progress=False)
    for name, bias in before.items():
        expected = _bias(reference.get_submodule(name))
        assert not torch.equal(expected, bias), name  # the reference corrected every layer
        torch.testing.assert_close(_bias(qmodel.get_submodule(name)), expected, rtol=0, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ptq_methods_run_on_cuda_with_cpu_batches(prepared: nn.Module) -> None:
    """A model on the GPU, batches from a CPU DataLoader: every batch is moved to the model's device as it is read.
    CLE and bias correction give what they give on the CPU (to float rounding: the GPU sums in another order);
    reconstruction runs there and leaves every tensor on the GPU."""
    dataset = TensorDataset(torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    states = {}
    for device in ("cpu", "cuda"):
        qmodel = copy.deepcopy(prepared).to(device)
        mq.calibrate(qmodel, DataLoader(dataset, batch_size=8), progress=False)
        mq.ptq(qmodel, "cle,bias_correction", DataLoader(dataset, batch_size=8), progress=False)
        states[device] = {k: v.cpu() for k, v in qmodel.state_dict().items()}
    for name, value in states["cpu"].items():
        if value.is_floating_point():
            torch.testing.assert_close(states["cuda"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    mq.ptq(qmodel, "qdrop", DataLoader(dataset, batch_size=8), iterations=2, progress=False)
    assert all(t.device.type == "cuda" for t in qmodel.state_dict().values())
