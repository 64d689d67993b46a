"""Project-wide rules: no torch.ao in the library, ruff clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [ROOT / "mq_core", *sorted((ROOT / "plugins").glob("mq_*/mq_*"))]


def _library_files() -> list[Path]:
    return sorted(p for root in LIBRARY for p in root.rglob("*.py"))


def _mentions_torch_ao(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("torch.ao")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports_ao = node.module == "torch" and any(a.name == "ao" for a in node.names)
            if node.module.startswith("torch.ao") or imports_ao:
                found.append(node.module)
        elif isinstance(node, ast.Attribute) and node.attr == "ao":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append("torch.ao")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in {
            "import_module", "__import__"
        }:
            found += [a.value for a in node.args if isinstance(a, ast.Constant) and "torch.ao" in str(a.value)]
    return found


def test_library_never_uses_torch_ao() -> None:
    files = _library_files()
    assert len(files) > 10
    offenders = {
        str(p.relative_to(ROOT)): hits for p in files if (hits := _mentions_torch_ao(ast.parse(p.read_text())))
    }
    assert offenders == {}, "the library must not use torch.ao (deprecated): " + repr(offenders)


def test_the_torch_ao_check_can_fail() -> None:
    assert _mentions_torch_ao(ast.parse("from torch.ao.quantization import QuantStub"))
    assert _mentions_torch_ao(ast.parse("import torch\nx = torch.ao.quantization.QConfig"))
    assert _mentions_torch_ao(ast.parse("from torch import ao"))
    assert not _mentions_torch_ao(ast.parse("import torch.fx"))


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed by the test extra")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
