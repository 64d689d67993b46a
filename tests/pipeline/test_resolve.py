"""Names become objects in mq_core.pipeline.resolve: backends, qconfig presets, quantizers, ``pkg.mod:name`` refs.

The data classes only hold names (``Backend``, ``QuantizerSpec``); a prepared model carries the ``Backend`` object.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import mq_core as mq
from mq_core.pipeline.resolve import build_quantizer, import_ref, is_ref, resolve_backend
from mq_core.quant.observers.minmax import MinMaxObserver
from mq_core.quant.qconfig import QuantizerSpec
from mq_core.quant.scheme import QuantScheme


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()


X = torch.randn(1, 3, 6, 6)


# --- PrepareInfo carries the Backend object -------------------------------------------------------------------------
def test_prepare_info_carries_the_installed_backend_and_records_its_name() -> None:
    info = mq.prepare_info(mq.prepare(_net(), "QDQ", X))
    assert info.target is mq.get_backend("qdq")
    assert info.backend == "qdq" and info.to_dict()["backend"] == "qdq"
    with pytest.raises(AttributeError):
        info.backend = "tensorrt"  # the name is the object's: it cannot drift from it


def test_prepare_info_carries_a_custom_backend_object_as_given() -> None:
    custom = dataclasses.replace(mq.get_backend("qdq"), name="my-npu", aliases=(), description="a custom object")
    q = mq.prepare(_net(), custom, X)
    info = mq.prepare_info(q)
    assert info.target is custom and info.backend == "my-npu" and info.custom_backend
    assert mq.prepare_info(copy.deepcopy(q)).target == custom


# --- backends and qconfigs ------------------------------------------------------------------------------------------
def test_resolve_backend_takes_a_name_or_an_object_and_refuses_anything_else() -> None:
    backend = mq.get_backend("qdq")
    assert resolve_backend("qdq") is backend and resolve_backend(backend) is backend
    with pytest.raises(mq.ConfigError, match="backend must be a backend name"):
        resolve_backend(42)  # type: ignore[arg-type]


def test_resolve_qconfig_default_preset_and_full_qconfig() -> None:
    backend = mq.get_backend("qdq")
    assert mq.resolve_qconfig(backend) == backend.qconfig
    w4a4 = mq.resolve_qconfig("qdq", "w4a4")
    assert w4a4 == mq.get_qconfig("w4a4").apply(backend.qconfig)
    assert (w4a4.weight.scheme.bits, w4a4.activation.scheme.bits) == (4, 4)
    assert mq.resolve_qconfig(backend, w4a4) is w4a4


def test_build_quantizer_finds_names_takes_classes_and_overrides_the_channel_axis() -> None:
    spec = QuantizerSpec(QuantScheme(8, per_channel=True, ch_axis=0), observer="minmax")
    fq = build_quantizer(spec, ch_axis=1, exact=False)
    assert isinstance(fq, mq.FixedFakeQuantizer) and isinstance(fq.observer, MinMaxObserver)
    assert fq.scheme.ch_axis == 1 and fq.exact is False
    assert build_quantizer(spec.replace(observer=MinMaxObserver)).scheme.ch_axis == 0
    with pytest.raises(mq.UnknownNameError, match="no_such_observer"):
        build_quantizer(spec.replace(observer="no_such_observer"))


# --- import_ref: the one resolver of "pkg.module:name" ---------------------------------------------------------------
@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module on sys.path, not imported yet, whose top-level code leaves a marker file when it runs."""
    name = f"mq_probe_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n\ndef factory():\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def test_import_ref_without_import_never_imports(probe_module: tuple[str, Path]) -> None:
    name, marker = probe_module
    with pytest.raises(ModuleNotFoundError, match="not imported"):
        import_ref(f"{name}:factory", allow_import=False)
    assert name not in sys.modules and not marker.exists()


def test_import_ref_with_import_runs_the_module_as_pkgutil_does(probe_module: tuple[str, Path]) -> None:
    name, marker = probe_module
    assert import_ref(f"{name}:factory", allow_import=True)() == 7
    assert marker.exists()
    marker.unlink()
    assert import_ref(f"{name}:factory", allow_import=False)() == 7  # imported now: found without importing again
    assert not marker.exists()


def test_import_ref_without_import_runs_no_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Meta(type):
        def __getattr__(cls, attr: str) -> object:
            calls.append(f"metaclass {attr}")
            return 1

    class Holder(metaclass=Meta):
        @property
        def value(self) -> int:
            calls.append("property")
            return 1

    module = types.ModuleType("mq_probe_hooks")
    module.__getattr__ = lambda attr: calls.append(f"module {attr}")  # type: ignore[attr-defined]
    module.Holder = Holder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mq_probe_hooks", module)
    for ref in ("mq_probe_hooks:missing", "mq_probe_hooks:Holder.missing"):
        with pytest.raises(AttributeError):
            import_ref(ref, allow_import=False)
    assert isinstance(import_ref("mq_probe_hooks:Holder.value", allow_import=False), property)
    assert calls == []


@pytest.mark.parametrize("ref", ["no_colon", "my-models:build", "mod:", ":name", "mod:f.<locals>.g", "1mod:x"])
def test_import_ref_refuses_malformed_text_before_importing(ref: str) -> None:
    assert not is_ref(ref)
    for allow_import in (False, True):
        with pytest.raises(ValueError, match=r"package\.module:name"):
            import_ref(ref, allow_import=allow_import)
