"""The public plugin API: what it exports (pinned), and the rule that plugins, the example plugin and the plugin
docs import nothing else from mq_core.

Every name pinned here is a promise to third-party plugins (docs/plugins.md, "Stable API"): removing or renaming
one is a breaking change that needs a deprecation release, so this list changes only on purpose.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
import typing
from collections.abc import Iterable
from pathlib import Path

import click
import pytest
from torch import nn

import mq_core
from mq_core import hookspecs, plugin_api

ROOT = Path(__file__).resolve().parents[1]

PLUGIN_API = [
    "Artifact",
    "Backend",
    "CalibrationData",
    "CalibrationError",
    "ClipStdObserver",
    "ConfigError",
    "ExportContext",
    "ExportError",
    "ExportResult",
    "Exporter",
    "FakeQuantizer",
    "FusionPattern",
    "Graph",
    "INT8_SYM",
    "INT8_SYM_PER_CHANNEL",
    "INT8_SYM_PER_CHANNEL_NARROW",
    "MQError",
    "MinMaxObserver",
    "ModulePredicate",
    "Observer",
    "PASSTHROUGH_OPS",
    "PTQMethod",
    "PlacementPolicy",
    "QATBnModule",
    "QATModule",
    "QConfig",
    "QConfigPreset",
    "QDQExporter",
    "QDQPair",
    "QuantScheme",
    "QuantTable",
    "QuantizerSpec",
    "RangesFile",
    "RangesFileExporter",
    "Register",
    "RegisterQATModule",
    "Runnable",
    "Runtime",
    "SATURATION_NOTE",
    "SCALE_EPS",
    "SchemeError",
    "TensorQuant",
    "UINT8_AFFINE",
    "UINT8_SYM",
    "VerificationError",
    "all_reduce",
    "along_axis",
    "apply_table",
    "bn_scale_factor",
    "channel_view",
    "channels_first",
    "check_choice",
    "disable_all",
    "fake_quantize",
    "graph_order",
    "hookimpl",
    "in_graph_order",
    "input_placement",
    "int8_may_saturate",
    "make_node",
    "model_inputs",
    "num_inputs",
    "output_placement",
    "prepare_info",
    "propagate_through_passthrough",
    "quantize",
    "quantizers",
    "rebuild_qdq",
    "reset_plugins",
    "resolve_qconfig",
    "run_batch",
    "shorten",
    "strip_qdq",
    "uncovered_tensors",
    "unsigned_view",
    "weights_as_device_quantizes",
]


def test_plugin_api_exports_exactly_the_pinned_names() -> None:
    assert sorted(plugin_api.__all__) == sorted(PLUGIN_API), (
        "mq_core.plugin_api.__all__ changed: a removed or renamed name breaks third-party plugins (deprecate it "
        "first, docs/plugins.md 'Stable API'); a new name is a new promise - add it to PLUGIN_API on purpose"
    )
    assert len(set(plugin_api.__all__)) == len(plugin_api.__all__)


def test_every_public_name_resolves() -> None:
    missing = [name for name in plugin_api.__all__ if not hasattr(plugin_api, name)]
    missing += [f"mq_core.{name}" for name in mq_core.__all__ if not hasattr(mq_core, name)]
    assert missing == []


def test_names_shared_with_mq_core_are_the_same_objects() -> None:
    """A name exported from both places is one object, so ``isinstance`` checks agree whichever import was used.

    The one exception is ``quantize``: for plugin authors the tensor function (``quantize(x, scale, zero_point,
    scheme)``, stable), for users the one-call job (``mq.quantize(model, backend, data)``, named as in the other
    toolkits)."""
    shared = set(plugin_api.__all__) & set(mq_core.__all__) - {"quantize"}
    assert shared, "plugin_api and mq_core share the core types (Backend, Exporter, ...)"
    assert [name for name in sorted(shared) if getattr(plugin_api, name) is not getattr(mq_core, name)] == []


def _hook_types(module: object) -> dict[str, object]:
    """The resolved type of each hook's argument in ``module`` (hookspecs or a plugin's plugin.py)."""
    names = {**{n: getattr(plugin_api, n) for n in plugin_api.__all__}, "nn": nn, "click": click}
    return {
        name: next(iter(typing.get_type_hints(fn, localns=names).values()))
        for name, fn in vars(module).items()
        if name.startswith("register_") and callable(fn)
    }


def test_hookspecs_type_register_with_the_public_protocols() -> None:
    types = _hook_types(hookspecs)
    assert set(types) == {*hookspecs.REGISTRY_HOOKS, "register_commands"}
    assert types["register_backends"] == plugin_api.Register[plugin_api.Backend]
    assert types["register_observers"] == plugin_api.Register[type[plugin_api.Observer]]
    assert types["register_qat_modules"] is plugin_api.RegisterQATModule
    assert types["register_commands"] is click.Group
    assert all(typing.get_origin(t) is plugin_api.Register for h, t in types.items() if h in hookspecs.REGISTRY_HOOKS
               and h != "register_qat_modules")


def test_plugin_hooks_are_annotated_like_the_hookspecs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _hook_types(hookspecs)
    plugins = [importlib.import_module(f"{p.name}.plugin") for p in sorted((ROOT / "plugins").glob("mq_*"))]
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "mq_plugin_example"))
    try:  # the example is not installed here: import its source, then forget it (its own tests install it)
        plugins.append(importlib.import_module("mq_plugin_example.plugin"))
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "mq_plugin_example"]:
            del sys.modules[name]
    hooks = {f"{m.__name__}.{name}": (name, t) for m in plugins for name, t in _hook_types(m).items()}
    assert len(hooks) >= 12
    assert {where: t for where, (name, t) in hooks.items() if t != spec[name]} == {}


# --- the rule: plugins, the example plugin and the plugin docs use only the public API -------------------------


def _is_public_module(module: str) -> bool:
    return module == "mq_core.testing" or module.startswith("mq_core.testing.")


def _is_mq_core(module: str) -> bool:
    return module == "mq_core" or module.startswith("mq_core.")


def api_violations(source: str, top_level: Iterable[str], plugin_api_names: Iterable[str]) -> list[str]:
    """Every import of mq_core in ``source`` (module level, in functions, under TYPE_CHECKING) that is not public.

    Public: ``import mq_core [as x]`` (then only ``x.<name in top_level>``), ``from mq_core import <top_level>``,
    ``from mq_core.plugin_api import <plugin_api_names>``, and ``mq_core.testing`` with its modules, imported
    either way. ``importlib.import_module`` / ``__import__`` of a constant string count as imports.
    """
    top, api = set(top_level), set(plugin_api_names)
    tree = ast.parse(source)
    found: list[str] = []
    package_aliases: set[str] = set()  # names bound to the mq_core package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "mq_core":
                    package_aliases.add(alias.asname or "mq_core")
                elif _is_public_module(alias.name):
                    if not alias.asname:  # `import mq_core.testing.zoo` binds mq_core; `... as zoo` binds zoo
                        package_aliases.add("mq_core")
                elif _is_mq_core(alias.name):
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_mq_core(node.module):
            allowed = {"mq_core": top | {"testing"}, "mq_core.plugin_api": api}.get(node.module)
            if allowed is None and _is_public_module(node.module):
                continue
            bad = [a.name for a in node.names if allowed is None or a.name not in allowed]
            if bad:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(bad)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in {
            "import_module", "__import__"
        }:
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _is_mq_core(arg.value):
                    if arg.value != "mq_core" and not _is_public_module(arg.value):
                        found.append(f"line {node.lineno}: import_module({arg.value!r})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in package_aliases and node.attr not in top | {"testing"}:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return sorted(set(found), key=lambda s: (int(s.split()[1].rstrip(":")), s))


def _python_blocks(markdown: str) -> list[tuple[int, str]]:
    """The fenced ```python blocks of a markdown file, each with the line its code starts on."""
    blocks = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S):
        blocks.append((markdown.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


def _sources() -> list[tuple[str, str]]:
    files = sorted((ROOT / "plugins").glob("mq_*/mq_*/**/*.py"))
    files += sorted((ROOT / "examples" / "mq_plugin_example").glob("**/*.py"))
    sources = [(str(p.relative_to(ROOT)), p.read_text()) for p in files]
    for doc in (ROOT / "docs" / "plugins.md", ROOT / "examples" / "mq_plugin_example" / "README.md"):
        blocks = _python_blocks(doc.read_text())
        assert blocks, f"{doc} has no python block: the docs check would check nothing"
        sources += [(f"{doc.relative_to(ROOT)}:{line}", code) for line, code in blocks]
    return sources


def test_plugins_use_only_the_public_api() -> None:
    sources = _sources()
    assert len(sources) > 40, "the plugin sources were not found"
    offenders = {}
    for where, code in sources:
        if hits := api_violations(code, mq_core.__all__, plugin_api.__all__):
            offenders[where] = hits
    assert offenders == {}, (
        "plugins, the example plugin and docs/plugins.md import only mq_core's top-level names, "
        "mq_core.plugin_api and mq_core.testing (internal modules move between releases); offenders: "
        + repr(offenders)
    )


def test_the_plugin_api_check_can_fail() -> None:
    def check(code: str) -> list[str]:
        return api_violations(code, mq_core.__all__, plugin_api.__all__)

    assert check("from mq_core.export.ranges import rebuild_qdq") == [
        "line 1: from mq_core.export.ranges import rebuild_qdq"
    ]
    assert check("def f():\n    import mq_core.pipeline.prepare\n") == ["line 2: import mq_core.pipeline.prepare"]
    assert check("from mq_core import quant") == ["line 1: from mq_core import quant"]
    assert check("from mq_core.plugin_api import Exporter, not_there") == [
        "line 1: from mq_core.plugin_api import not_there"
    ]
    assert check("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mq_core.nn.qat import QATModule\n")
    assert check("import mq_core as mq\nmq.plugins.reset()") == ["line 2: mq.plugins"]
    assert check("import importlib\nimportlib.import_module('mq_core.export.qdq')")

    assert check("from mq_core.plugin_api import Exporter\nfrom mq_core.testing.zoo import ZOO") == []
    assert check("import mq_core as mq\nimport mq_core.testing.golden\nmq.prepare\nmq_core.testing.golden") == []
    assert check("from mq_core import Backend, hookimpl, testing\nfrom . import fixpos") == []


def test_a_runtime_written_against_the_public_api_loads_without_torch() -> None:
    """plugin_api loads its names lazily: the runtime worker (which skips mq_core's package __init__) imports a
    runtime plugin module that takes ``Runtime`` from plugin_api without importing torch."""
    code = textwrap.dedent(f"""
        import runpy, sys
        worker = runpy.run_path({str(ROOT / "mq_core" / "runtimes" / "_worker.py")!r}, run_name="not_main")
        sys.meta_path.insert(0, worker["_SkipCoreInits"]())
        import mq_openvino.runtime
        assert issubclass(mq_openvino.runtime.OpenVINORuntime, mq_openvino.runtime.Runtime)
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
