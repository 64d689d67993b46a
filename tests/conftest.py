"""Shared fixtures: installed fixture plugin distributions and a clean plugin manager per test."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import mq_core.plugins

FIXTURE_DISTS = Path(__file__).parent / "fixtures" / "dists"

# The conformance fixtures that third-party plugin authors use; the backend matrix uses them too.
pytest_plugins = ["mq_core.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def fixture_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory holding the fixture plugin distributions, installed for real by pip (dist-info and all).

    pip builds setuptools projects in their source folder, so each session (each xdist worker) builds private
    copies: two workers building the same folder at once would race on its build/ and egg-info.
    """
    target = tmp_path_factory.mktemp("fixture-site")
    sources = tmp_path_factory.mktemp("fixture-sources")
    dists = []
    for project in sorted(p for p in FIXTURE_DISTS.iterdir() if (p / "pyproject.toml").exists()):
        shutil.copytree(project, sources / project.name,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        dists.append(str(sources / project.name))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), *dists],
        check=True,
    )
    return target


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch, fixture_site: Path) -> Iterator[Callable[..., None]]:
    """Make the fixture distributions discoverable; call it with env vars (MQ_PLUGINS=...) to reload with them."""

    def activate(**env: str) -> None:
        for var in ("MQ_PLUGINS", "MQ_DISABLE_PLUGINS", "MQ_PREFER"):
            monkeypatch.delenv(var, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        mq_core.plugins.reset()

    monkeypatch.syspath_prepend(str(fixture_site))
    importlib.invalidate_caches()
    yield activate
    mq_core.plugins.reset()


@pytest.fixture
def deterministic() -> Iterator[None]:
    """A fixed seed, and one intra-op thread for the duration of the test (the models are tiny; on a loaded 2-core
    machine a second thread only adds contention, ~4x the run time). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("deterministic")``."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_plugin_state() -> Iterator[None]:
    """No test sees registries loaded under another test's environment."""
    yield
    mq_core.plugins.reset()
