"""Every command shown in the README and docs/ runs, in order, in a fresh folder.

Fenced ``bash`` and ``python`` blocks are executed; a block may be skipped only with an explicit reason in an HTML
comment right above it (``<!-- skip: why -->``), e.g. installing from the package index. ``text``/``toml``
blocks are illustrations. The README's ``make test`` is this very suite (CI runs it) and is not re-entered.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = {"bash", "python"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.+?)\s*-->")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: str | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match["lang"]:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(previous)
        blocks.append(Block(path, start + 1, match["lang"], textwrap.dedent("\n".join(body)) + "\n",
                            skip["reason"] if skip else None))
        i += 1
    return blocks


def _readme_commands(code: str, out: Path) -> str:
    """The README's first screen: run `make demo` for real (into a temporary folder); `make test` is this suite."""
    lines = []
    for line in code.splitlines():
        command = line.split("#")[0].strip()
        if command == "make demo":
            lines.append(f"make -C {ROOT} demo DEMO_OUT={out}")
        elif command != "make test":
            lines.append(line)
    return "\n".join(lines) + "\n"


def _environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MQ_CACHE_DIR"] = str(cache)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


ALL_BLOCKS = [b for doc in DOCUMENTS for b in parse(doc)]
DOCS_WITH_COMMANDS = sorted({b.path for b in ALL_BLOCKS if b.lang in RUNNABLE and b.skip is None})


def test_documents_show_runnable_commands() -> None:
    assert ROOT / "README.md" in DOCS_WITH_COMMANDS
    assert len([b for b in ALL_BLOCKS if b.lang in RUNNABLE and b.skip is None]) >= 10


def test_every_skipped_block_says_why() -> None:
    for block in ALL_BLOCKS:
        if block.skip is not None:
            assert len(block.skip) > 15, f"{block}: a skipped block needs a real reason"


@pytest.mark.parametrize("document", DOCS_WITH_COMMANDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_run(document: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.getbasetemp() / "mq-cache"  # shared: the digits model trains once per session
    env = _environment(cache)
    for block in parse(document):
        if block.lang not in RUNNABLE or block.skip is not None:
            continue
        code = _readme_commands(block.code, tmp_path / "demo-out") if document.name == "README.md" else block.code
        command = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (
            f"{block} failed ({result.returncode}):\n{code}\n{result.stdout}\n{result.stderr}"
        )
