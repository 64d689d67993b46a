"""pytest fixtures for plugin authors: run mq's conformance kit on your backend.

Enable in your ``conftest.py``::

    pytest_plugins = ["mq_core.testing.pytest_plugin"]

then::

    import pytest
    from mq_core.testing.zoo import ZOO

    @pytest.mark.parametrize("model", sorted(ZOO))
    def test_my_backend_conforms(mq_conformance, model):
        result = mq_conformance("my-backend", model)
        assert result.passed, result.summary()
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mq_core.testing.conformance import ConformanceResult, run_zoo_conformance


@pytest.fixture
def mq_conformance(tmp_path: Path) -> Callable[..., ConformanceResult]:
    """``mq_conformance(backend, zoo_model, **options)`` -> ConformanceResult (artifacts under tmp_path)."""

    def run(backend: str, model: str, **options: Any) -> ConformanceResult:
        return run_zoo_conformance(backend, model, tmp_path / f"{backend}-{model}", **options)

    return run
