"""Checkpoints of prepared models: state dict + how the model was prepared, loadable with weights_only=True.

A checkpoint holds only tensors and plain data (no pickled classes), so ``torch.load(weights_only=True)`` reads
it. To restore, prepare the same float model again with the recorded settings and load the state dict:
``restore(model_factory(), load_checkpoint(path))``. ``model_ref`` (``pkg.module:factory``) lets the CLI rebuild
the float model by itself.

A checkpoint is data, but it can *name* code: the float model's factory (``model_ref``), types and functions in
``skip``/``leaf_modules``, observer or quantizer classes given in place of registry names. Importing a module runs
its top-level code, so a file from elsewhere must not choose what gets imported: ``restore`` finds a reference
only in modules that are already imported (the model's own module is, once the model is built), reads it without
running any hook, and checks it is of the kind its use needs; ``trust=True`` allows the import. The CLI calls
``model_ref`` only when the user confirms it (``--model``, ``--trust-model-ref``) or it is mq's own demo factory.
Every field is checked on loading, so a malformed or crafted file is one ``ConfigError``, never a traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError, MQError, SchemeError
from mq_core.io import atomic_torch_save
from mq_core.pipeline.prepare import MODES, NOT_IMPORTABLE, PrepareInfo, input_specs, object_ref, prepare, prepare_info
from mq_core.pipeline.resolve import import_ref
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.observers.base import Observer
from mq_core.quant.qconfig import QConfig
from mq_core.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

FORMAT = "mq-checkpoint/1"
#: Most elements of one recorded example input: restoring allocates it, and a crafted file must not exhaust memory.
MAX_INPUT_ELEMENTS = 2**28
#: Values ``torch.load(weights_only=True)`` reads back, besides containers of them.
_PLAIN = (type(None), bool, int, float, str, torch.Tensor, torch.dtype)


def _is_module_type(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


#: What a recorded reference must name, per use: a file can only select code of the kind mq uses there.
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "skip": ("a module type or a function",
             lambda o: _is_module_type(o) or isinstance(o, (types.FunctionType, types.BuiltinFunctionType))),
    "leaf_modules": ("a module type", _is_module_type),
    "observer": ("an Observer class", lambda o: isinstance(o, type) and issubclass(o, Observer)),
    "fake_quantizer": ("a FakeQuantizer class", lambda o: isinstance(o, type) and issubclass(o, FakeQuantizer)),
}


def _dtype(name: Any) -> torch.dtype | None:
    """The torch dtype called ``name``, read from torch's namespace without triggering its lazy imports."""
    value = vars(torch).get(name) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def inputs_from_specs(specs: list[dict[str, Any]], seed: int = 0) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """Example inputs of the recorded shapes and dtypes (values are random: only shapes matter for prepare).

    Inputs recorded from a dict (``save_checkpoint`` with a tokenizer-style dict: each spec has its ``key``) come
    back as a dict in the recorded order, so that ``prepare`` binds them to the same forward arguments and the
    graph takes them in the same order as when the model was prepared; ``export``/``verify`` order a dict by the
    prepared model's input names."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = _dtype(spec["dtype"])
        if dtype is None:
            raise ConfigError(f"input dtype {spec['dtype']!r} is not a torch dtype (e.g. 'float32', 'int64').")
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=gen).to(dtype))
        else:
            out.append(torch.zeros(spec["shape"], dtype=dtype))
    if specs and all("key" in spec for spec in specs):
        return {spec["key"]: value for spec, value in zip(specs, out)}
    return tuple(out)


def save_checkpoint(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor],
    *,
    model_ref: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``qmodel``'s state and preparation settings to ``path`` atomically.

    ``example_inputs`` are those ``qmodel`` was prepared with (only their shapes and dtypes are stored). A dict of
    keyword arguments (a tokenizer's output) is recorded with its keys, in its order, and restored as such a dict.
    Refuses (``ConfigError``) what no restore could rebuild: a skip/leaf item or an observer/quantizer class that
    cannot be found by name again (a lambda, a class defined inside a function), and values that are not plain data
    (``extra`` and options may hold numbers, strings, lists, dicts and tensors).
    """
    info = prepare_info(qmodel)
    keys: list[str] | None = None
    if isinstance(example_inputs, Mapping):
        keys = list(example_inputs)
        if not all(isinstance(k, str) for k in keys):
            raise ConfigError("example_inputs given as a dict must map forward's argument names (strings) to tensors.")
        inputs = tuple(example_inputs.values())
    else:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if model_ref is not None and not isinstance(model_ref, str):
        raise ConfigError(f"model_ref must be a 'package.module:factory' string, got {type(model_ref).__name__}.")
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra must be a dict of plain data, got {type(extra).__name__}.")
    specs = input_specs(inputs)
    if None in specs:
        raise ConfigError("a checkpoint records the shape and dtype of each example input, so every example input "
                          "must be a tensor; pass the tensors the model was prepared with.")
    for spec, key in zip(specs, keys or ()):
        spec["key"] = key
    payload = {
        "format": FORMAT,
        "info": _recordable_info(info),
        "state_dict": qmodel.state_dict(),
        "inputs": specs,
        "model_ref": model_ref,
        "extra": extra or {},
    }
    for key in ("info", "state_dict", "extra"):
        _check_storable(payload[key], key)
    return atomic_torch_save(payload, path)


def _recordable_info(info: PrepareInfo) -> dict[str, Any]:
    """``info`` as plain data: observer/quantizer classes given in place of registry names become references."""
    data = info.to_dict()
    recorded = []
    qconfigs = {"qconfig's": data["qconfig"]} | {f"qconfig for {p!r}'s": q for p, q in data["layer_qconfigs"].items()
                                                 if q is not None}
    for label, qconfig in qconfigs.items():
        for role in ("weight", "activation"):
            spec = qconfig[role]
            for key in ("observer", "fake_quantizer"):
                spec[key] = object_ref(spec[key])
                recorded.append((f"{label} {role} {key.replace('_', ' ')}", spec[key]))
    recorded += [(f"{option} entry", item) for option in ("skip", "leaf_modules") for item in data[option]]
    for label, text in recorded:
        if text.startswith(NOT_IMPORTABLE):
            raise ConfigError(
                f"cannot save a checkpoint of this model: its {label} {text[len(NOT_IMPORTABLE):-1]} cannot be found "
                "by name again (a lambda, or a class or function defined inside a function), so no restore could "
                "rebuild the model. Define it at module level (or use a registered name or a module name), prepare "
                "again and save."
            )
    return data


def _check_storable(value: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back, naming where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"cannot save a checkpoint: {where} has the key {key!r}; keys must be strings.")
            _check_storable(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ConfigError(
            f"cannot save a checkpoint: {where} holds a {type(value).__name__}, which a checkpoint cannot store (it "
            "is read with torch.load(weights_only=True), which loads no classes or functions). Keep it to numbers, "
            "strings, lists, dicts and tensors."
        )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no code is unpickled), checking
    every field, so that a malformed or crafted file is one ``ConfigError`` here rather than a traceback later."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable mq checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an mq checkpoint (expected format {FORMAT!r}); save one with "
                          "mq.save_checkpoint(qmodel, path, example_inputs).")
    _validate(payload, str(path))
    return payload


class _Malformed(Exception):
    """One problem found by ``_validate``; never leaves this module (it becomes a ConfigError)."""


def _expect(ok: bool, problem: str) -> None:
    if not ok:
        raise _Malformed(problem)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _validate(payload: Any, source: str) -> None:
    """Every field ``restore``, ``mq inspect`` and the CLI read, with the type they need."""
    try:
        _expect(isinstance(payload, dict) and payload.get("format") == FORMAT, f"its format is not {FORMAT!r}")
        info = payload.get("info")
        _expect(isinstance(info, dict), "'info' is not a table of settings")
        _expect(isinstance(info.get("backend"), str) and bool(info["backend"]), "'info.backend' is not a name")
        _expect(info.get("mode") in MODES, f"'info.mode' is {info.get('mode')!r}, not one of {MODES}")
        _expect(type(info.get("exact")) is bool, "'info.exact' is not true or false")
        _expect(type(info.get("custom_backend", False)) is bool, "'info.custom_backend' is not true or false")
        for key in ("modules", "skip", "leaf_modules"):
            _expect(_names(info.get(key)), f"'info.{key}' is not a list of names")
        _expect(_names(info.get("preserved_attributes", [])), "'info.preserved_attributes' is not a list of names")
        _validate_qconfig(info.get("qconfig"))
        layers = info.get("layer_qconfigs", {})
        _expect(isinstance(layers, dict) and all(isinstance(p, str) and p for p in layers),
                "'info.layer_qconfigs' is not a table of layer patterns")
        for qconfig in layers.values():
            if qconfig is not None:
                _validate_qconfig(qconfig)
        inputs = payload.get("inputs")
        _expect(isinstance(inputs, list) and bool(inputs), "'inputs' is not a list of input shapes")
        for i, spec in enumerate(inputs):
            _validate_input(spec, f"'inputs[{i}]'")
        named = sum("key" in spec for spec in inputs)
        _expect(named in (0, len(inputs)), "'inputs' names some inputs by key and not others")
        state = payload.get("state_dict")
        _expect(isinstance(state, dict), "'state_dict' is not a state dict")
        for key, value in state.items():
            _expect(isinstance(key, str) and (isinstance(value, torch.Tensor) or key.endswith("_extra_state")),
                    f"'state_dict' entry {key!r} is not a tensor")
        _expect(payload.get("model_ref") is None or isinstance(payload["model_ref"], str),
                "'model_ref' is not a 'package.module:factory' text")
        _expect(isinstance(payload.get("extra", {}), dict), "'extra' is not a table")
    except _Malformed as exc:
        raise ConfigError(
            f"{source} is not a valid mq checkpoint: {exc}. It was not written by mq.save_checkpoint or was changed "
            "since; save it again from the prepared model."
        ) from None


def _validate_qconfig(data: Any) -> None:
    _expect(isinstance(data, dict) and isinstance(data.get("name", "default"), str), "'info.qconfig' is not a qconfig")
    for role in ("weight", "activation"):
        where = f"'info.qconfig.{role}"
        spec = data.get(role)
        _expect(isinstance(spec, dict), f"{where}' is not a quantizer spec")
        for key in ("observer", "fake_quantizer"):
            _expect(isinstance(spec.get(key), str) and bool(spec[key]), f"{where}.{key}' is not a name")
        for key in ("observer_options", "fake_quantizer_options"):
            options = spec.get(key, {})
            _expect(isinstance(options, dict) and all(isinstance(k, str) for k in options),
                    f"{where}.{key}' is not a table of options")
        scheme = spec.get("scheme")
        _expect(isinstance(scheme, dict), f"{where}.scheme' is not a grid")
        for f in dataclasses.fields(QuantScheme):
            if f.name in scheme:
                kind = type(f.default)
                _expect(type(scheme[f.name]) is kind,
                        f"{where}.scheme.{f.name}' is {scheme[f.name]!r}, not a {kind.__name__}")
    try:
        QConfig.from_dict(data)
    except SchemeError as exc:
        raise _Malformed(f"'info.qconfig' holds an invalid grid ({exc})") from None


def _validate_input(spec: Any, where: str) -> None:
    _expect(isinstance(spec, dict), f"{where} is not an input spec")
    shape = spec.get("shape")
    _expect(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape), f"{where} has no valid shape")
    _expect(math.prod(shape) <= MAX_INPUT_ELEMENTS,
            f"{where} has {math.prod(shape)} elements, more than the {MAX_INPUT_ELEMENTS} a checkpoint may ask for")
    _expect(_dtype(spec.get("dtype")) is not None, f"{where} has dtype {spec.get('dtype')!r}, not a torch dtype")
    _expect(isinstance(spec.get("key", ""), str), f"{where} has a key that is not an argument name")


def _resolve(item: str, use: str, label: str, override: str, trust: bool) -> Any:
    """A recorded ``"module:qualname"`` reference, found as ``import_ref`` allows (importing only with ``trust``)
    and checked to be of the kind its use needs; a clear error naming the reference and how to allow it."""
    what, fits = _KINDS[use]
    try:
        obj = import_ref(item, allow_import=trust)
    except Exception as exc:  # any failure of a named module (ImportError, SyntaxError, raising at import), or no attr
        log.debug("cannot resolve %r: %s: %s", item, type(exc).__name__, exc)
        obj = None
    module = item.partition(":")[0]
    if obj is None and not trust and module not in sys.modules:
        raise ConfigError(
            f"the checkpoint's {label} {item!r} names module {module!r}, which is not imported, and importing it "
            "would run its code: mq imports modules named by a file only when you trust the file. If you do, pass "
            f"trust=True to mq.restore (command line: --trust-model-ref); otherwise pass {override} to mq.restore "
            "yourself."
        )
    if obj is None:
        raise ConfigError(f"the checkpoint's {label} {item!r} cannot be found here; pass {override} to mq.restore "
                          "explicitly.")
    if not fits(obj):
        raise ConfigError(f"the checkpoint's {label} {item!r} is a {type(obj).__name__}, not {what}; pass {override} "
                          "to mq.restore explicitly.")
    return obj


def _recorded_qconfig(data: dict[str, Any], trust: bool) -> QConfig:
    """The recorded QConfig; observer/quantizer references (classes given in place of names) resolved."""
    qconfig = QConfig.from_dict(data)
    specs = {}
    for role in ("weight", "activation"):
        spec = getattr(qconfig, role)
        changes = {
            key: _resolve(getattr(spec, key), key, f"{role} {key.replace('_', ' ')}", "qconfig=...", trust)
            for key in ("observer", "fake_quantizer") if ":" in getattr(spec, key)
        }
        specs[role] = spec.replace(**changes)
    return dataclasses.replace(qconfig, **specs)


#: ``prepare`` options that ``restore`` may take instead of the recorded ones.
_OVERRIDABLE = frozenset(inspect.signature(prepare).parameters) - {"model", "backend", "example_inputs"}


def restore(
    model: nn.Module,
    checkpoint: dict[str, Any],
    *,
    backend: Backend | str | None = None,
    trust: bool = False,
    **prepare_overrides: Any,
) -> nn.Module:
    """Prepare the float ``model`` exactly as recorded and load the checkpoint's state into it.

    Args:
        backend: the ``Backend`` object to prepare for; needed when the model was prepared with a custom Backend
            object (one that is not the installed backend of its name), which a recorded name cannot rebuild.
        trust: import the modules that the checkpoint's references (skip/leaf types and functions, observer or
            quantizer classes) name when they are not imported yet. Importing runs a module's code, so pass it only
            for files from a source you trust; without it such a reference is an error saying which it is.
        prepare_overrides: ``prepare`` options to use instead of the recorded ones (``qconfig=``, ``skip=``, ...).
    """
    _validate(checkpoint, "the checkpoint")
    unknown = sorted(set(prepare_overrides) - _OVERRIDABLE)
    if unknown:
        raise ConfigError(f"mq.restore() got unknown option(s) {unknown}; it takes prepare()'s options: "
                          f"{', '.join(sorted(_OVERRIDABLE))}.")
    info = checkpoint["info"]
    if backend is None and info.get("custom_backend", False):
        raise ConfigError(
            f"this checkpoint was prepared with a custom Backend object named {info['backend']!r} (not the installed "
            "backend of that name), which a recorded name cannot rebuild. Pass the same object again: "
            "mq.restore(model, checkpoint, backend=my_backend); to use it from the command line, register it in a "
            "plugin and prepare with its name."
        )
    options: dict[str, Any] = {
        "mode": info["mode"],
        "modules": info["modules"] or None,
        "exact": info["exact"],
        "preserved_attributes": info.get("preserved_attributes", []),
        "capture": info.get("capture", "fx"),
    }
    if "qconfig" not in prepare_overrides:
        options["qconfig"] = _recorded_qconfig(info["qconfig"], trust)
        layers = info.get("layer_qconfigs", {})
        if layers:  # per-layer qconfigs: the recorded rules, the default as "*" unless a rule covers it
            options["qconfig"] = {"*": options["qconfig"]} | {
                p: None if q is None else _recorded_qconfig(q, trust) for p, q in layers.items()}
    for option in ("skip", "leaf_modules"):
        if option not in prepare_overrides:
            options[option] = [
                _resolve(item, option, f"{option} entry", f"{option}=[...]", trust) if ":" in item else item
                for item in info[option]
            ]
    options.update(prepare_overrides)
    try:
        qmodel = prepare(model, backend or info["backend"], inputs_from_specs(checkpoint["inputs"]), **options)
    except MQError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. recorded options an observer does not take
        raise ConfigError(
            f"the checkpoint's settings do not prepare this model ({type(exc).__name__}: {exc}). Restore it with the "
            "mq version and plugins that wrote it, or pass the differing setting (e.g. qconfig=) to mq.restore."
        ) from exc
    try:
        qmodel.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(
            f"the checkpoint does not match the model prepared from it ({exc}). Pass the same float model "
            "architecture that was quantized."
        ) from exc
    if info["mode"] == "ptq":
        qmodel.eval()
    return qmodel
