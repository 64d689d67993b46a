"""Project-wide rules: no torch.ao in the library, mq_core's layers and no import cycle in it, ruff clean."""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import sys
from collections import defaultdict
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


# --- the import graph of mq_core (from the AST; nothing is imported) -----------------------------------------------
#: (importer, imported, file, line, kind): kind is "top" (module level) or "func" (inside a function: it runs when
#: the function does, so it counts); imports under ``if TYPE_CHECKING:`` never run and are left out.
Edge = tuple[str, str, str, int, str]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement of a module with its kind: top, func or typing."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, kind))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, "typing" if kind == "typing" else "func")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(ast.Module(body=child.body, type_ignores=[]), "typing")
                visit(ast.Module(body=child.orelse, type_ignores=[]), kind)
            else:
                visit(child, kind)

    visit(tree, "top")
    return found


def _targets(node: ast.Import | ast.ImportFrom, this: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules of the package an import statement runs: ``from pkg import name`` is ``pkg.name`` when that is a
    module, else ``pkg``; relative imports are resolved."""

    def closest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return [hit for alias in node.names if (hit := closest(alias.name))]
    base = node.module or ""
    if node.level:
        anchor = this if is_package else this.rpartition(".")[0]
        for _ in range(node.level - 1):
            anchor = anchor.rpartition(".")[0]
        base = f"{anchor}.{base}".rstrip(".") if base else anchor
    found = []
    for alias in node.names:
        hit = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else closest(base)
        found += [hit] if hit else []
    return found


def collect_edges(root: Path, package: str) -> tuple[set[str], list[Edge]]:
    """The modules of the package in folder ``root`` and its import edges (top-level and function-level)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    modules = set(files)
    edges = set()
    for module, path in files.items():
        for node, kind in _imports(ast.parse(path.read_text(), str(path))):
            if kind == "typing":
                continue
            for target in _targets(node, module, path.name == "__init__.py", modules):
                if target != module:
                    edges.add((module, target, path.relative_to(root.parent).as_posix(), node.lineno, kind))
    return modules, sorted(edges)


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, *_ in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(modules):
        if start in index:
            continue
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(sorted(graph[start])))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = [stack.pop()]
                    while component[-1] != node:
                        component.append(stack.pop())
                    on_stack.difference_update(component)
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found, key=len, reverse=True)


def _cycle_report(edges: list[Edge], found: list[list[str]]) -> str:
    lines = []
    for component in found:
        members = set(component)
        lines.append(f"cycle of {len(component)} modules:")
        lines += [f"  {a} -> {b}  ({path}:{line}, {kind})" for a, b, path, line, kind in edges
                  if a in members and b in members]
    return "\n".join(lines)


@functools.cache
def _mq_core_graph() -> tuple[set[str], list[Edge]]:
    return collect_edges(ROOT / "mq_core", "mq_core")


def test_mq_core_has_no_import_cycle() -> None:
    modules, edges = _mq_core_graph()
    assert len(modules) > 50
    found = cycles(modules, edges)
    assert found == [], "import cycles in mq_core (move the upward import's target down a layer, or the code that " \
                        "needs it up; see docs/design.md 'Layers'):\n" + _cycle_report(edges, found)


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "b.py").write_text("from pkg.a import f\n")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")
    assert cycles(*collect_edges(package, "pkg")) == [["pkg.a", "pkg.b"]]
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n")
    assert cycles(*collect_edges(package, "pkg")) == []


# --- layers: each imports only its own layer (acyclically) and those below -------------------------------------------
#: docs/design.md "Layers", bottom to top. A name ending in ".*" is a package with everything in it; the longest
#: matching name places a module (``mq_core.export.qdq`` is an implementation although ``mq_core.export.*`` is
#: lower). Every module must be placed: a new module needs a line here, so its layer is decided, not drifted into.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("mq_core._version", "mq_core.errors", "mq_core.io", "mq_core.quiet", "mq_core.text")),
    ("quant", ("mq_core.quant.*",)),
    ("graph", ("mq_core.graph.*", "mq_core.nn.*")),
    ("targets and artifacts", ("mq_core.backend", "mq_core.runtimes.*", "mq_core.export.*")),
    ("plugin machinery", ("mq_core.hookspecs", "mq_core.plugins.*")),
    ("implementations", ("mq_core.builtin", "mq_core.export.qdq", "mq_core.export.ranges_file",
                         "mq_core.runtimes.onnxruntime")),
    ("orchestration", ("mq_core.pipeline.*", "mq_core.checkpoint", "mq_core.summary", "mq_core.testing.*",
                       "mq_core.demo.*", "mq_core.report.*")),
    ("surface", ("mq_core", "mq_core.plugin_api", "mq_core.cli.*", "mq_core.__main__")),
]
#: Modules that know nothing of plugins, the command line or orchestration (issue 11: names become objects in the
#: pipeline, never in data classes), and what they must never import.
LOW_LEVEL = ("mq_core.quant.*", "mq_core.graph.*", "mq_core.nn.*", "mq_core.backend", "mq_core.runtimes.*")
NOT_FROM_LOW_LEVEL = ("mq_core.plugins.*", "mq_core.cli.*", "mq_core.pipeline.*", "mq_core.plugin_api", "mq_core")


def _matches(module: str, pattern: str) -> bool:
    base = pattern.removesuffix(".*")
    return module == base or (pattern.endswith(".*") and module.startswith(base + "."))


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """The layer number of ``module`` (0 = the bottom), by its longest matching name; None when unplaced."""
    placed = [(len(p.removesuffix(".*")), number) for number, (_, patterns) in enumerate(layers) for p in patterns
              if _matches(module, p)]
    return max(placed)[1] if placed else None


def layer_violations(modules: set[str], edges: list[Edge],
                     layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    """Each module no layer places, and each import from a lower layer up to a higher one, as one line."""
    found = [f"{m} is in no layer: add it to LAYERS" for m in sorted(modules) if layer_of(m, layers) is None]
    for a, b, path, line, kind in edges:
        low, high = layer_of(a, layers), layer_of(b, layers)
        if low is not None and high is not None and high > low:
            found.append(f"{a} ({layers[low][0]}) imports {b} ({layers[high][0]}) upward at {path}:{line} ({kind})")
    return found


def forbidden_imports(edges: list[Edge]) -> list[str]:
    """Each import of a low-level module (``LOW_LEVEL``) of plugins, the CLI, the pipeline or the public surface."""
    return [f"{a} imports {b} at {path}:{line} ({kind})" for a, b, path, line, kind in edges
            if any(_matches(a, p) for p in LOW_LEVEL) and any(_matches(b, p) for p in NOT_FROM_LOW_LEVEL)]


def test_low_layers_never_import_plugins_cli_or_pipeline() -> None:
    _, edges = _mq_core_graph()
    assert forbidden_imports(edges) == []


def test_the_low_layer_check_can_fail() -> None:
    bad = ("mq_core.quant.qconfig", "mq_core.plugins.lookup", "mq_core/quant/qconfig.py", 34, "func")
    fine = ("mq_core.quant.qconfig", "mq_core.quant.scheme", "mq_core/quant/qconfig.py", 12, "top")
    assert forbidden_imports([bad, fine]) == ["mq_core.quant.qconfig imports mq_core.plugins.lookup at "
                                              "mq_core/quant/qconfig.py:34 (func)"]
    assert len(forbidden_imports([("mq_core.backend", "mq_core", "mq_core/backend.py", 3, "top")])) == 1


def test_imports_follow_the_layers() -> None:
    modules, edges = _mq_core_graph()
    assert layer_violations(modules, edges) == []


def test_the_layer_check_can_fail() -> None:
    modules = {"mq_core.export.exporter", "mq_core.plugins.manager", "mq_core.export.qdq", "mq_core.newthing"}
    edges = [("mq_core.export.exporter", "mq_core.plugins.manager", "mq_core/export/exporter.py", 28, "top"),
             ("mq_core.export.qdq", "mq_core.plugins.manager", "mq_core/export/qdq.py", 5, "top")]
    assert layer_violations(modules, edges) == [
        "mq_core.newthing is in no layer: add it to LAYERS",
        "mq_core.export.exporter (targets and artifacts) imports mq_core.plugins.manager (plugin machinery) upward "
        "at mq_core/export/exporter.py:28 (top)",
    ]
    assert layer_of("mq_core") == len(LAYERS) - 1 and layer_of("mq_core.quant.observers.kl") == 1


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed by the test extra")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
