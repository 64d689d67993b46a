"""Fixtures shared by the robustness tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread and a fixed seed: results of training and export tests do not depend on the core count
    (``make test`` sets OMP_NUM_THREADS=1; a plain ``pytest`` run may not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
