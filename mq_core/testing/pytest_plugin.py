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

A backend's format tests read the artifacts of the zoo models through ``zoo_exports``, which exports each
(backend, model, exporters) once per test module::

    def test_my_format(zoo_exports):
        results, inputs = zoo_exports("my-backend", "resnet")
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mq_core.export import ExportResult
from mq_core.testing.conformance import ConformanceResult, export_zoo_model, run_zoo_conformance


@pytest.fixture
def mq_conformance(tmp_path: Path) -> Callable[..., ConformanceResult]:
    """``mq_conformance(backend, zoo_model, **options)`` -> ConformanceResult (artifacts under tmp_path)."""

    def run(backend: str, model: str, **options: Any) -> ConformanceResult:
        return run_zoo_conformance(backend, model, tmp_path / f"{backend}-{model}", **options)

    return run


@pytest.fixture(scope="module")
def zoo_exports(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[dict[str, ExportResult], torch.Tensor]]:
    """``zoo_exports(backend, zoo_model, exporters=None)`` -> (results by exporter, input): ``export_zoo_model``,
    run once per argument tuple in a test module however many tests read its files."""
    made: dict[tuple[str, str, tuple[str, ...] | None], tuple[dict[str, ExportResult], torch.Tensor]] = {}

    def get(backend: str, model: str,
            exporters: list[str] | None = None) -> tuple[dict[str, ExportResult], torch.Tensor]:
        key = (backend, model, None if exporters is None else tuple(exporters))
        if key not in made:
            made[key] = export_zoo_model(backend, model, tmp_path_factory.mktemp(f"{backend}-{model}"), exporters)
        return made[key]

    return get
