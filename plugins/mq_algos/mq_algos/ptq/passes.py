"""One streamed pass of the data with statistics hooks: what CLE, bias correction and SmoothQuant each measure with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mq_core.plugin_api import run_batch


def run_hooked(model: nn.Module, data: Iterable[Any], handles: Sequence[RemovableHandle],
               stop: tuple[type[Exception], ...] = ()) -> int:
    """Run every batch of ``data`` through ``model`` without gradients while the hooks of ``handles`` record what
    they measure, then remove the hooks, also when a forward fails; returns the number of batches. A hook that has
    seen all it needs of a batch raises one of ``stop``, which ends that batch's forward there."""
    batches = 0
    try:
        with torch.no_grad():
            for batch in data:
                try:
                    run_batch(model, batch)
                except stop:
                    pass
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    return batches
