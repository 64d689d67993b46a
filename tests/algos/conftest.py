"""One intra-op thread for each module of algorithm tests, module fixtures included: their models are small, and
on a loaded 2-core machine a second thread only fights over the cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
