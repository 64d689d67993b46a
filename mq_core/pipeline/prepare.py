"""prepare(): float model in, quantization-simulating model out, for one backend.

capture (torch.fx, or torch.export for models fx cannot trace) -> fuse (the registered patterns; BN folded now
in PTQ mode, kept for simulated folding in QAT mode) -> swap layers for QAT modules with weight fake quantizers
-> place activation quantizers (backend policy).
The result is an ``nn.Module`` (a GraphModule, or the original model with quantized sub-modules) carrying an
``mq_info`` record of how it was prepared, so checkpoints can rebuild it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import io
import logging
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from mq_core.backend import Backend
from mq_core.errors import ConfigError, MQError, TraceError, describe_exception
from mq_core.graph.capture import DIM_BOUNDS_META, DYNAMIC_META, export_trace, linears_from_conv1d, trace
from mq_core.graph.fusion import fuse
from mq_core.graph.layer_qconfig import LayerQConfigs, layer_name, pattern_matches_name
from mq_core.graph.ops import MASK_MAGNITUDE, MASK_VALUE_META
from mq_core.graph.placement import Annotation, QuantizedTensor, Skip, annotate, materialize
from mq_core.graph.qat_swap import swap_qat_modules
from mq_core.pipeline.resolve import QConfigLike, build_quantizer, import_ref, resolve_backend, resolve_layer_qconfigs
from mq_core.plugins.lookup import fusion_patterns, get_backend, qat_module_mapping
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.qconfig import QConfig, QConfigPreset, QuantizerSpec

log = logging.getLogger(__name__)

MODES = ("ptq", "qat")
#: Capture front-ends: torch.fx symbolic tracing, torch.export, or fx with a fallback to torch.export.
CAPTURES = ("auto", "fx", "export")
#: GraphModule.meta key whose attributes survive copy.deepcopy (torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY).
_PRESERVED_KEY = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


@dataclass
class PrepareInfo:
    """How a model was prepared: enough to prepare the same float model again and load a checkpoint.

    ``target`` is the ``Backend`` object itself, so readers (export, verify, workflow) need no registry lookup and a
    custom Backend object is used as given; ``backend`` is its name, which checkpoints record.
    """

    target: Backend
    qconfig: QConfig
    mode: str
    modules: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    leaf_modules: list[str] = field(default_factory=list)
    exact: bool = True
    placements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: attribute names copied from the float model (``prepare(preserved_attributes=...)``); restore copies them again
    preserved_attributes: list[str] = field(default_factory=list)
    #: prepared for a ``Backend`` object that is not the installed backend of its name: a name cannot rebuild it
    custom_backend: bool = False
    #: shape and dtype of each example input (None for one that is not a tensor): calibration data is checked
    #: against them (``mq_core.pipeline.calibrate.model_inputs``). Checkpoints store them beside ``info`` as "inputs".
    inputs: list[dict[str, Any] | None] = field(default_factory=list)
    #: the front-end that captured the graph ("fx" or "export"; ``prepare(capture="auto")`` records the one used)
    capture: str = "fx"
    #: bounds of each named dynamic dimension of the inputs ({"sequence": (2, 512)}; max None when unbounded)
    dim_bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    #: per-layer qconfigs, pattern -> QConfig (None: float), as given to ``prepare(qconfig={...})``; ``qconfig`` is
    #: then the default (``"*"``). Empty when one qconfig covers every layer.
    layer_qconfigs: dict[str, QConfig | None] = field(default_factory=dict)

    @property
    def qconfig_name(self) -> str:
        """The qconfig in words: its name, or each pattern's for per-layer qconfigs (``"*: w4a8, layer4: w8a8"``)."""
        return qconfig_names(self.qconfig.name,
                             {p: None if q is None else q.name for p, q in self.layer_qconfigs.items()})

    @property
    def backend(self) -> str:
        """The backend's registry name (what ``to_dict`` records for checkpoints)."""
        return self.target.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "qconfig": self.qconfig.to_dict(),
            "layer_qconfigs": {p: None if q is None else q.to_dict() for p, q in self.layer_qconfigs.items()},
            "mode": self.mode,
            "modules": list(self.modules),
            "skip": list(self.skip),
            "leaf_modules": list(self.leaf_modules),
            "exact": self.exact,
            "preserved_attributes": list(self.preserved_attributes),
            "custom_backend": self.custom_backend,
            "capture": self.capture,
        }

    def input_names(self) -> list[str | None]:
        """The name of each input of the prepared graph, in order (None where not recorded)."""
        return [None if spec is None else spec.get("name") for spec in self.inputs]


def qconfig_names(default: str, layers: Mapping[str, str | None]) -> str:
    """A qconfig in words: the default's name, or with per-layer qconfigs (pattern -> name, None for float) each
    pattern's (``"*: w4a8, layer4: w8a8, fc: float"``)."""
    if not layers:
        return default
    return ", ".join(f"{p}: {'float' if name is None else name}" for p, name in {"*": default, **layers}.items())


def as_inputs(example_inputs: Any, model: nn.Module | None = None) -> tuple[Any, ...]:
    """Inputs as a tuple in the order of the prepared graph's inputs (a single tensor is wrapped).

    A dict (``{"input_ids": ..., "attention_mask": ...}``, what a tokenizer returns) is put in the order of the
    inputs ``model`` was prepared with, by name; entries the model does not take (``token_type_ids`` for a model
    prepared without them) are ignored. A dict needs the prepared ``model``: its own order says nothing.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        names = prepare_info(model).input_names() if model is not None else []
        if not names or None in names:
            raise ConfigError(
                "inputs given as a dict need the prepared model to put them in order (as_inputs(inputs, qmodel)); "
                "pass a tuple in the order of the model's inputs instead."
            )
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise ConfigError(f"the inputs dict has keys {sorted(map(str, example_inputs))} but the model was "
                              f"prepared with inputs {names}: {', '.join(map(repr, missing))} missing.")
        return tuple(example_inputs[n] for n in names)
    raise ConfigError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of named tensors, got "
        f"{type(example_inputs).__name__}."
    )


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``prepare``'s example inputs as positional and keyword arguments of the model's forward."""
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise ConfigError("example_inputs given as a dict must map forward's argument names (strings) to values.")
        return (), dict(example_inputs)
    return as_inputs(example_inputs), {}


class _MaskingShapeProp(ShapeProp):
    """ShapeProp that also marks inputs and buffers whose example value holds an additive-mask value (a precomputed
    mask passed in or stored; see graph/ops.py). Only those: a computed tensor that overflows (``exp`` of a large
    value) is not a mask, and calibration must report its Inf instead of leaving it float."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if (n.op in ("placeholder", "get_attr") and isinstance(result, torch.Tensor) and result.is_floating_point()
                and result.numel()
                and bool((result.detach().abs() >= MASK_MAGNITUDE).any())):
            n.meta[MASK_VALUE_META] = True
        return result


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Record each node's output dtype/shape (placement needs to know which nodes produce float tensors)."""
    was_training = gm.training
    gm.eval()
    printed = io.StringIO()  # ShapeProp prints a traceback before raising: the error below says it in one paragraph
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            _MaskingShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        log.debug("shape propagation failed:\n%s", printed.getvalue())
        cause = exc.__cause__ or exc  # ShapeProp wraps the model's own error in a page of graph metadata
        shapes = ", ".join(str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                           for t in example_inputs)
        raise TraceError(
            f"the traced model failed to run on example inputs of shape {shapes}: {describe_exception(cause)}. "
            "Pass example inputs with the shape and dtype the model expects (with "
            "mq quantize: --calib data shaped like the model's input)."
        ) from exc
    else:
        sys.stderr.write(printed.getvalue())  # warnings printed on the way
    finally:
        gm.train(was_training)


def _placement_table(ann: Annotation) -> list[dict[str, Any]]:
    return [
        {
            "tensor": r.producer.name,
            "quantizer": r.quantizer,
            "consumers": "all" if r.consumers is None else [c.name for c in r.consumers],
            "unsigned": r.unsigned,
            "reason": r.reason,
        }
        for r in ann.tensors.values()
    ]


def _fx_capture(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], leaf_modules: Sequence[type | str],
    concrete_args: dict[str, Any] | None, preserved_attributes: Sequence[str],
) -> tuple[fx.GraphModule, tuple[Any, ...]]:
    """fx capture; returns the graph and the values of its placeholders. Keyword example inputs are bound to
    forward's parameters; the parameters not given are fixed to their defaults (fx ``concrete_args``)."""
    if not kwargs:
        return trace(module, leaf_modules, concrete_args, preserved_attributes), args
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"example_inputs do not match {type(module).__name__}.forward: {exc}.") from None
    fixed = dict(concrete_args or {})
    values = []
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in bound.arguments:
            values.append(bound.arguments[name])
        else:
            default = None if param.default is param.empty else param.default
            fixed.setdefault(name, default)
            values.append(fixed[name])
    return trace(module, leaf_modules, fixed, preserved_attributes), tuple(values)


def _capture(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], capture: str,
    leaf_modules: Sequence[type | str], concrete_args: dict[str, Any] | None, preserved_attributes: Sequence[str],
) -> tuple[fx.GraphModule, tuple[Any, ...], str]:
    """The graph of ``module`` by the chosen front-end, its placeholder values, and the front-end used."""
    fx_error: TraceError | None = None
    if capture != "export":
        try:
            gm, values = _fx_capture(module, args, kwargs, leaf_modules, concrete_args, preserved_attributes)
            return gm, values, "fx"
        except TraceError as exc:
            if capture == "fx":
                raise
            fx_error = exc
            log.info("torch.fx cannot trace %s (%s); capturing it with torch.export instead (capture='export')",
                     type(module).__name__, str(exc.__cause__ or exc).splitlines()[0][:200])
    extra = {k: v for k, v in (concrete_args or {}).items() if k not in kwargs}
    try:
        gm = export_trace(module, args, {**kwargs, **extra}, leaf_modules, preserved_attributes)
    except TraceError as exc:
        if fx_error is None:
            raise
        # both failed: the fx error names the module and line, which is what the user fixes first
        raise TraceError(f"{fx_error} (torch.export failed too: {exc})") from fx_error
    return gm, tuple(a for a in (*args, *kwargs.values(), *extra.values()) if isinstance(a, torch.Tensor)), "export"


def _float_attention(gm: fx.GraphModule, module: nn.Module) -> list[str]:
    """The ``nn.MultiheadAttention`` modules of ``module`` that the graph calls: mq has no quantized version of
    them, so they stay float (skipped), and the user is told."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if names:
        log.warning("nn.MultiheadAttention %s stays in float: mq does not quantize its fused in/out projections. To "
                    "quantize attention, write it with nn.Linear projections and torch.matmul/softmax (as "
                    "HuggingFace models do).", ", ".join(names))
    return names


def _prepare_graph(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    backend: Backend,
    qconfigs: LayerQConfigs,
    mode: str,
    skip: Skip,
    leaf_modules: Sequence[type | str],
    concrete_args: dict[str, Any] | None,
    preserved_attributes: Sequence[str],
    exact: bool,
    capture: str,
) -> tuple[fx.GraphModule, list[dict[str, Any]], tuple[Any, ...], str]:
    """Capture, fuse, QAT swap and place; returns the graph, its placement table, the values of its inputs (in
    order) and the front-end used."""
    converted = linears_from_conv1d(module)
    if converted:
        log.info("%d HuggingFace Conv1D layer(s) captured as the equivalent nn.Linear (weight transposed)",
                 len(converted))
    gm, values, used = _capture(module, args, kwargs, capture, leaf_modules, concrete_args, preserved_attributes)
    _bind_preserved_methods(gm, module, preserved_attributes)
    attention = _float_attention(gm, module)
    if attention:
        skip = Skip(skip.names | frozenset(attention), skip.types, skip.functions)
    fuse(gm, fusion_patterns(), mode)
    floats = qconfigs.float_nodes(gm.graph)  # layers a per-layer qconfig leaves in float are skipped
    if floats:
        skip = Skip(skip.names | floats, skip.types, skip.functions)
    swap_qat_modules(gm, qat_module_mapping(), lambda ch_axis, node: build_quantizer(
        (qconfigs.for_node(node) or qconfigs.default).weight, ch_axis, exact), skip, backend.placement.weight_kinds)
    _propagate_shapes(gm, values)
    ann = annotate(gm, backend.placement, skip)

    # the layer each activation quantizer follows, decided before materialize rewires the consumers
    owners = {producer: qconfigs.owner(producer, [u for u in (producer.users if r.consumers is None else r.consumers)
                                                 if u.op != "output"]) for producer, r in ann.tensors.items()}

    def activation_spec(record: QuantizedTensor) -> QuantizerSpec:
        return (qconfigs.for_node(owners[record.producer]) or qconfigs.default).activation

    materialize(gm, ann, activation_spec, lambda spec: build_quantizer(spec, exact=exact))
    for producer, record in ann.tensors.items():
        gm.get_submodule(record.quantizer).layer = layer_name(owners[producer])
    gm.train(module.training)
    return gm, _placement_table(ann), values, used


def _bind_preserved_methods(gm: fx.GraphModule, source: nn.Module, names: Sequence[str]) -> None:
    """A preserved method (``predict``) runs on the prepared model: the tracer copied it bound to the float copy,
    so ``qmodel.predict(x)`` would have computed in float. Attributes the method reads must be preserved too."""
    for name in names:
        value = getattr(gm, name)
        if inspect.ismethod(value) and value.__self__ is source:
            bound = types.MethodType(value.__func__, gm)
            setattr(gm, name, bound)
            # the deepcopy record too: copy.deepcopy rebinds a method bound to gm to the copy of gm
            gm.meta.setdefault(_PRESERVED_KEY, {})[name] = bound


def _is_installed(backend: Backend) -> bool:
    """Whether the installed backend of ``backend.name`` is this one (equal as data), so its name rebuilds it."""
    try:
        return get_backend(backend.name) == backend
    except MQError:  # not installed, or claimed by two plugins: the name does not say which backend it was
        return False


def _submodule_inputs(model: nn.Module, names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> dict[str, tuple]:
    """Run the float model once and record the positional inputs each named sub-module receives."""
    captured: dict[str, tuple] = {}
    hooks = []
    for name in names:
        sub = model.get_submodule(name)
        hooks.append(sub.register_forward_pre_hook(lambda _m, args, n=name: captured.setdefault(n, args)))
    # Eval mode for this probe run: in QAT mode the model may be training, and a training-mode forward would
    # update every BatchNorm's running statistics with the example inputs before they are copied into QAT modules.
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    missing = [n for n in names if n not in captured]
    if missing:
        raise ConfigError(f"sub-modules {missing} are never called by the model's forward on example_inputs.")
    return captured


def input_specs(inputs: tuple[Any, ...], gm: fx.GraphModule | None = None) -> list[dict[str, Any] | None]:
    """Shape and dtype of each example input (None for one that is not a tensor): what calibration data is checked
    against, and what a checkpoint records to rebuild example inputs.

    With the prepared graph ``gm``, each spec also holds the input's ``name`` (its placeholder) and ``dynamic``,
    the dimensions that may differ from the example, ``{dim: name}``: the batch for fx graphs, the batch and the
    sequence of integer inputs for torch.export graphs (what the capture left dynamic)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"] if gm is not None else []
    dynamic = gm.meta.get(DYNAMIC_META) if gm is not None else None
    specs: list[dict[str, Any] | None] = []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            specs.append(None)
            continue
        spec: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if gm is not None:
            spec["name"] = names[i] if i < len(names) else None
            spec["dynamic"] = dict(dynamic[i]) if dynamic is not None and i < len(dynamic) else {0: "batch"}
        specs.append(spec)
    return specs


def _items(value: Any, option: str, kinds: tuple[type, ...], what: str) -> list[Any]:
    """An option holding names (and types/functions): a single item means a list of one (``skip="fc"``)."""
    if isinstance(value, str | type) or (callable(value) and not isinstance(value, nn.Module)):
        value = [value]
    if not isinstance(value, Iterable) or isinstance(value, nn.Module):
        raise ConfigError(f"{option} must be a list of {what}, got {type(value).__name__}.")
    items = list(value)
    for item in items:
        if isinstance(item, nn.Module) or not isinstance(item, kinds):
            fix = " (pass its name, as model.named_modules() lists it)" if isinstance(item, nn.Module) else ""
            raise ConfigError(f"{option} must be a list of {what}; {item!r} is of type {type(item).__name__}{fix}.")
    return items


def _check_names(option: str, names: Iterable[str], known: set[str], where: str) -> None:
    """Every name in ``names`` is one of ``known``; a ConfigError naming the closest ones otherwise (a misspelled
    layer name would otherwise be ignored without a word)."""
    for name in names:
        if name in known:
            continue
        # "backbone.conv" for "conv" (a name given from the root while names are relative to a quantized sub-module)
        suffixes = sorted((k for k in known if name.endswith("." + k)), key=len, reverse=True)
        near = list(dict.fromkeys(suffixes + difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)))[:3]
        hint = f"did you mean {', '.join(map(repr, near))}?" if near else (
            f"names there include {', '.join(sorted(n for n in known if '.' not in n)[:10])}.")
        raise ConfigError(f"{option}: {where} has no module or layer named {name!r}; {hint} Use qualified names as "
                          "model.named_modules() lists them.")


def _check_patterns(qconfigs: LayerQConfigs, layers: set[str], where: str) -> None:
    """Every per-layer qconfig pattern names a module or layer of the model (a misspelled one would silently
    quantize that layer with the default); a ConfigError naming the closest names otherwise."""
    for pattern, _qconfig in qconfigs.rules:
        if any(pattern_matches_name(pattern, name) for name in layers):
            continue
        literal = pattern.split("*")[0].split("?")[0].split("[")[0] or pattern
        near = difflib.get_close_matches(literal, sorted(layers), n=5, cutoff=0.5)
        hint = f"close names: {', '.join(map(repr, near))}." if near else (
            f"names there include {', '.join(sorted(n for n in layers if '.' not in n)[:10])}.")
        raise ConfigError(f"qconfig: the pattern {pattern!r} matches no module or layer of {where}; {hint} Patterns "
                          "are module paths as model.named_modules() lists them (a path covers its sub-modules; "
                          "'*' and '?' are wildcards), or '*' for the default.")


def _module_names(roots: Iterable[nn.Module]) -> set[str]:
    """Qualified names of the sub-modules of each root (relative to it)."""
    return {name for root in roots for name, _ in root.named_modules() if name}


def prepare(
    model: nn.Module,
    backend: Backend | str,
    example_inputs: Any,
    qconfig: QConfigLike | Mapping[str, QConfigLike] = None,
    mode: str = "ptq",
    *,
    modules: Sequence[str] | None = None,
    skip: Iterable[str | type | Callable[..., Any]] = (),
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    preserved_attributes: Sequence[str] = (),
    exact: bool = True,
    inplace: bool = False,
    capture: str = "auto",
) -> nn.Module:
    """Prepare ``model`` for ``backend``: the returned model simulates the target's quantization.

    Args:
        model: the float model (not modified unless ``inplace``; HuggingFace ``Conv1D`` layers are captured as the
            equivalent ``nn.Linear``, see ``mq_core.graph.capture.linears_from_conv1d``).
        backend: a ``Backend`` or its name/alias.
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword arguments (``{"input_ids": ...,
            "attention_mask": ...}``) the model's forward accepts (used for capture and shape propagation). Their
            shapes and dtypes are recorded: calibration data must match them in every dimension but the dynamic
            ones (the batch; with torch.export capture also the sequence dimension of integer inputs). The
            prepared model takes the inputs in this order, by position or by name.
        qconfig: ``None`` for the backend's default, a preset name (``"w4a4"``), a preset or a full QConfig; or
            per-layer qconfigs, a dict of module-path patterns to any of those or ``"float"`` (``{"layer4": "w8a8",
            "*": "w4a8", "fc": "float"}``): a pattern covers the module it names and its sub-tree, ``fnmatch``
            wildcards allowed, the most specific match wins and ``"*"`` is the default. A weight follows its
            layer; an activation quantizer follows the layer producing the tensor (for a network input, or the
            output of a float layer, its first quantized consumer). Rules in ``mq_core.graph.layer_qconfig``; a
            pattern that names nothing in the model is a ``ConfigError`` naming the closest names, and a bit width
            the target cannot run a ``SchemeError`` naming the pattern.
        mode: ``"ptq"`` (BN folded now, model in eval mode) or ``"qat"`` (BN kept and its folding simulated).
        modules: quantize only these sub-modules (qualified names, e.g. ``["backbone"]``).
        skip: layers to leave in float: module names (or fx node names), module types or functions (e.g.
            ``["conv1", "fc"]``). With ``modules``, names are relative to the quantized sub-module.
        leaf_modules: module types or names that tracing must not enter (they stay float).
            A name in ``modules``/``skip``/``leaf_modules`` that the model does not have is a ``ConfigError``
            naming the closest ones; a single name may be passed as a string.
        concrete_args, preserved_attributes: passed to the tracer / copied onto the GraphModule.
        exact: use the division-based rounding that matches ONNX Runtime bit for bit (see docs/design.md).
        capture: ``"fx"`` (torch.fx symbolic tracing), ``"export"`` (torch.export, for models fx cannot trace,
            such as HuggingFace transformers) or ``"auto"``: fx, falling back to torch.export on a trace error
            with one log line. Both give the same placement where both can capture (docs/design.md).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare() needs an nn.Module, got {type(model).__name__}.")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
    if capture not in CAPTURES:
        raise ConfigError(f"capture must be one of {CAPTURES}, got {capture!r}.")
    if qconfig is not None and not isinstance(qconfig, QConfig | QConfigPreset | str | Mapping):
        raise ConfigError(f"qconfig must be None (the backend's default), a preset name such as 'w4a4', a "
                          f"QConfigPreset, a QConfig or a dict of per-layer qconfigs; got {qconfig!r}.")
    for flag, value in (("exact", exact), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be True or False, got {value!r}.")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise ConfigError(f"concrete_args must be a dict of argument name -> value, got {concrete_args!r}.")
    modules = _items(modules or [], "modules", (str,), "sub-module names")
    skip_items = _items(skip, "skip", (str, type, Callable), "module names, module types or functions")
    leaf_modules = _items(leaf_modules, "leaf_modules", (str, type), "module names or module types")
    _check_names("modules", modules, _module_names([model]), "the model")
    quantized = _module_names([model.get_submodule(name) for name in modules] or [model])
    where = "the model" if not modules else f"the quantized sub-module(s) {', '.join(modules)} (names relative to them)"
    _check_names("leaf_modules", (n for n in leaf_modules if isinstance(n, str)), quantized, where)
    backend = resolve_backend(backend)
    qconfigs = resolve_layer_qconfigs(backend, qconfig)
    resolved = qconfigs.default
    args, kwargs = split_inputs(example_inputs)
    skipper = Skip.build(skip_items)
    root = model if inplace else copy.deepcopy(model)
    if mode == "ptq":
        root.eval()
    common = dict(backend=backend, qconfigs=qconfigs, mode=mode, skip=skipper, leaf_modules=leaf_modules,
                  concrete_args=concrete_args, preserved_attributes=preserved_attributes, exact=exact,
                  capture=capture)
    placements: dict[str, list[dict[str, Any]]] = {}
    used: set[str] = set()
    if modules:
        sub_inputs = _submodule_inputs(root, modules, args, kwargs)
        for name in modules:
            sub = root.get_submodule(name)
            gm, placements[name], _values, how = _prepare_graph(sub, sub_inputs[name], {}, **common)
            used.add(how)
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, gm)
        result = root
        specs = input_specs(as_inputs(example_inputs) if not kwargs else tuple(kwargs.values()))
        bounds: dict[str, tuple[int, int | None]] = {}
    else:
        result, placements[""], values, how = _prepare_graph(root, args, kwargs, **common)
        used.add(how)
        specs = input_specs(values, result)
        bounds = dict(result.meta.get(DIM_BOUNDS_META, {}))
    graphs = [result] if not modules else [result.get_submodule(name) for name in modules]
    layers = quantized | {node.name for gm in graphs for node in gm.graph.nodes if node.op != "output" and not (
        node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), FakeQuantizer))}
    _check_names("skip", (n for n in skip_items if isinstance(n, str)), layers, where)
    _check_patterns(qconfigs, layers, where)
    result.mq_info = PrepareInfo(
        target=backend,
        qconfig=resolved,
        mode=mode,
        modules=list(modules or []),
        skip=[object_ref(s) for s in skip_items],
        leaf_modules=[object_ref(s) for s in leaf_modules],
        exact=exact,
        placements=placements,
        preserved_attributes=list(preserved_attributes),
        custom_backend=not _is_installed(backend),
        inputs=specs,
        capture="export" if "export" in used else "fx",
        dim_bounds=bounds,
        layer_qconfigs=dict(qconfigs.rules) if isinstance(qconfig, Mapping) else {},
    )
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module from its graph and drops plain attributes such as mq_info;
        # it re-attaches the ones listed under this meta key (as torch's own prepare_fx does).
        result.meta.setdefault(_PRESERVED_KEY, {})["mq_info"] = result.mq_info
    log.info("prepared %s for %s (%s, %s)", type(model).__name__, backend.name, result.mq_info.qconfig_name, mode)
    return result


def object_ref(obj: Any) -> str:
    """A skip/leaf item (or a class given in place of a registry name) as plain text for ``PrepareInfo``: names stay
    as they are; a type or function becomes ``"module:qualname"`` (a ':' never occurs in a module name), so that
    ``checkpoint.restore`` can find it again. Recording only ``__qualname__`` ("Linear") made a restored model treat
    it as a module name. What cannot be found by name again (a lambda, a class defined inside a function) becomes
    ``NOT_IMPORTABLE`` + its repr + ``>``, which ``save_checkpoint`` refuses."""
    if isinstance(obj, str):
        return obj
    module = getattr(obj, "__module__", None)
    for attr in ("__qualname__", "__name__"):
        name = getattr(obj, attr, None)
        if not (module and name):
            continue
        try:
            found = import_ref(f"{module}:{name}", allow_import=False)
        except (ValueError, ImportError, AttributeError):  # "f.<locals>.g", "<lambda>", a module gone from sys.modules
            continue
        if found is obj:
            return f"{module}:{name}"
    return f"{NOT_IMPORTABLE}{obj!r}>"


#: Prefix of ``object_ref``'s text for an object that cannot be found by name again.
NOT_IMPORTABLE = "<not importable: "


def prepare_info(qmodel: nn.Module) -> PrepareInfo:
    """The ``PrepareInfo`` of a prepared model; a clear error for a model that was never prepared."""
    info = getattr(qmodel, "mq_info", None)
    if not isinstance(info, PrepareInfo):
        raise ConfigError("this model was not prepared by mq; call mq.prepare(model, backend, example_inputs) first.")
    return info
