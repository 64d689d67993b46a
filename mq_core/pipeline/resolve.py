"""Names become objects here, and only here: backend names, qconfig presets, observer and quantizer names, and
``pkg.module:name`` references.

Data classes (``Backend``, ``QConfig``, ``QuantizerSpec``) hold names and check values; they never look anything
up, so the layers below the plugin machinery (``quant/``, ``graph/``, ``backend.py``) do not depend on it. The
pipeline steps call these functions when they need the objects a name stands for.
"""

from __future__ import annotations

import inspect
import pkgutil
import sys
from collections.abc import Mapping
from typing import Any

from mq_core.backend import Backend
from mq_core.errors import ConfigError, MQError
from mq_core.graph.layer_qconfig import DEFAULT_PATTERN, LayerQConfigs
from mq_core.plugins.lookup import get_backend, get_fake_quantizer, get_observer, get_qconfig
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.qconfig import QConfig, QConfigPreset, QuantizerSpec


def resolve_backend(backend: Backend | str) -> Backend:
    """A ``Backend`` object as given, or the installed backend of a name or alias (case-insensitive)."""
    if not isinstance(backend, Backend | str):
        raise ConfigError(f"backend must be a backend name (see `mq backends`) or a Backend, got {backend!r}.")
    return get_backend(backend)


def resolve_qconfig(backend: Backend | str, qconfig: QConfig | QConfigPreset | str | None = None) -> QConfig:
    """The QConfig to use on ``backend``: its default (``None``), a preset (object or name, e.g. ``"w4a4"``) applied
    to that default, or a full QConfig as given; refused (``SchemeError``) when the target cannot run its bit widths.
    """
    target = resolve_backend(backend)
    if qconfig is None:
        resolved = target.qconfig
    elif isinstance(qconfig, QConfig):
        resolved = qconfig
    else:
        resolved = get_qconfig(qconfig).apply(target.qconfig)
    target.check(resolved)
    return resolved


#: What ``prepare(qconfig=...)`` takes for one layer: the backend's default (None), a preset name, a preset or a
#: QConfig. A per-layer mapping also takes "float" (or None) for a layer left unquantized.
QConfigLike = QConfig | QConfigPreset | str | None
#: The name a per-layer qconfig mapping gives a layer left in float.
FLOAT = "float"


def resolve_layer_qconfigs(backend: Backend | str, qconfig: QConfigLike | Mapping[str, QConfigLike]) -> LayerQConfigs:
    """``prepare``'s ``qconfig`` as per-layer rules: one qconfig for every layer, or a mapping of module-path
    patterns (``{"layer4": "w8a8", "*": "w4a8", "fc": "float"}``, see ``mq_core.graph.layer_qconfig``) to qconfigs.
    Each value is resolved and checked against the target now, and an error names the pattern it came from."""
    target = resolve_backend(backend)
    if not isinstance(qconfig, Mapping):
        return LayerQConfigs(resolve_qconfig(target, qconfig))
    if not qconfig:
        raise ConfigError("the per-layer qconfig mapping is empty; give at least the default, e.g. {'*': 'w8a8'}.")
    rules: list[tuple[str, QConfig | None]] = []
    for pattern, value in qconfig.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"per-layer qconfig keys are module-path patterns such as 'layer4' or '*', got "
                              f"{pattern!r}.")
        if value is None or value == FLOAT:
            rules.append((pattern, None))
            continue
        if not isinstance(value, QConfig | QConfigPreset | str):
            raise ConfigError(f"qconfig for {pattern!r} must be a preset name such as 'w8a8', 'float', a QConfigPreset "
                              f"or a QConfig; got {value!r}.")
        try:
            rules.append((pattern, resolve_qconfig(target, value)))
        except MQError as exc:
            raise type(exc)(f"qconfig for layer {pattern!r}: {exc}") from None
    default = dict(rules).get(DEFAULT_PATTERN) or target.qconfig
    return LayerQConfigs(default, tuple(rules))


def with_observer(backend: Backend | str, qconfig: QConfigLike | Mapping[str, QConfigLike], observer: str | None
                  ) -> QConfigLike | dict[str, QConfigLike]:
    """``qconfig`` on ``backend`` with its activation observer replaced by ``observer`` (``--observer``), the
    calibration method of every activation quantizer; weights keep theirs (a weight is known exactly, so min/max
    of it is what the targets use). Per-layer qconfigs get it in every layer that is not float."""
    if observer is None:
        return qconfig
    get_observer(observer)  # an unknown name fails here, with the installed observers listed
    if isinstance(qconfig, Mapping):
        chosen = {pattern: value if value is None or value == FLOAT else with_observer(backend, value, observer)
                  for pattern, value in qconfig.items()}
        return chosen if "*" in chosen else {"*": with_observer(backend, None, observer), **chosen}
    resolved = resolve_qconfig(backend, qconfig)
    activation = resolved.activation.replace(observer=observer, observer_options={})
    return QConfig(resolved.weight, activation, name=f"{resolved.name}, {observer} observer")


def build_quantizer(spec: QuantizerSpec, ch_axis: int | None = None, exact: bool = True) -> FakeQuantizer:
    """A fresh fake quantizer (with its observer) for ``spec``, its observer and quantizer found by name (or used
    as given when the spec holds classes). ``ch_axis`` overrides the scheme's channel axis of a per-channel grid
    (each QAT layer type knows its own); ``exact`` selects the rounding that matches ONNX Runtime bit for bit."""
    scheme = spec.scheme
    if scheme.per_channel and ch_axis is not None:
        scheme = scheme.replace(ch_axis=ch_axis)
    observer = get_observer(spec.observer)(scheme, **dict(spec.observer_options))
    return get_fake_quantizer(spec.fake_quantizer)(scheme, observer, exact=exact, **dict(spec.fake_quantizer_options))


def is_ref(text: str) -> bool:
    """Whether ``text`` has the form ``import_ref`` reads: dotted Python identifiers, a colon, dotted identifiers."""
    module_name, sep, qualname = text.partition(":")
    return bool(sep) and all(part.isidentifier() for name in (module_name, qualname) for part in name.split("."))


def import_ref(ref: str, *, allow_import: bool) -> Any:
    """The object a ``"package.module:qualname"`` reference names.

    With ``allow_import`` it is ``pkgutil.resolve_name``: the module is imported (running its top-level code) and
    the attributes are read. Without it (references read from a file nobody vouched for) the module must already
    be imported, and the attribute path is read with ``inspect.getattr_static``: no import, no module
    ``__getattr__``, property or metaclass hook runs, and nothing is called.

    Raises ``ValueError`` for text that is not of that form (``is_ref``; checked before any import),
    ``ImportError`` for a module that cannot be imported (without ``allow_import``: ``ModuleNotFoundError`` for one
    not imported yet), ``AttributeError`` for a missing attribute, and with ``allow_import`` whatever the module's
    own code raises while it is imported.
    """
    if not is_ref(ref):
        raise ValueError(f"{ref!r} is not a 'package.module:name' reference")
    module_name, _, qualname = ref.partition(":")
    if allow_import:
        return pkgutil.resolve_name(ref)
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        raise ModuleNotFoundError(f"module {module_name!r} is not imported", name=module_name)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
    return obj
