"""prepare(): float model in, quantization-simulating model out, for one backend.

capture (fx) -> fuse (the registered patterns; BN folded now in PTQ mode, kept for simulated folding in QAT mode)
-> swap layers for QAT modules with weight fake quantizers -> place activation quantizers (backend policy).
The result is an ``nn.Module`` (a GraphModule, or the original model with quantized sub-modules) carrying an
``mq_info`` record of how it was prepared, so checkpoints can rebuild it.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from mq_core.backend import Backend
from mq_core.errors import ConfigError, TraceError
from mq_core.graph.capture import trace
from mq_core.graph.fusion import fuse
from mq_core.graph.placement import Annotation, Skip, annotate, materialize
from mq_core.plugins.lookup import fusion_patterns, get_backend, qat_module_mapping
from mq_core.quant.qconfig import QConfig, QConfigPreset

log = logging.getLogger(__name__)

MODES = ("ptq", "qat")
#: GraphModule.meta key whose attributes survive copy.deepcopy (torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY).
_PRESERVED_KEY = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


@dataclass
class PrepareInfo:
    """How a model was prepared: enough to prepare the same float model again and load a checkpoint."""

    backend: str
    qconfig: QConfig
    mode: str
    modules: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    leaf_modules: list[str] = field(default_factory=list)
    exact: bool = True
    placements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "qconfig": self.qconfig.to_dict(),
            "mode": self.mode,
            "modules": list(self.modules),
            "skip": list(self.skip),
            "leaf_modules": list(self.leaf_modules),
            "exact": self.exact,
        }


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple (a single tensor is wrapped)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}."
    )


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Record each node's output dtype/shape (placement needs to know which nodes produce float tensors)."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise TraceError(
            f"the traced model failed to run on example_inputs: {type(exc).__name__}: {exc}. Pass example inputs "
            "with the shape and dtype the model expects."
        ) from exc
    finally:
        gm.train(was_training)


def _swap_qat_modules(gm: fx.GraphModule, qconfig: QConfig, skip: Skip, exact: bool) -> list[str]:
    mapping = qat_module_mapping()
    modules = dict(gm.named_modules())
    swapped = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or skip(node, modules):
            continue
        target = str(node.target)
        qat_type = mapping.get(type(modules[target]))
        if qat_type is None:
            continue
        fq = qconfig.weight.build(ch_axis=qat_type.weight_ch_axis, exact=exact)
        fq.qname = f"{target}.weight_fake_quant"
        fq.role = "weight"
        qat = qat_type.from_float(modules[target], fq)
        parent_name, _, child = target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, qat)
        modules[target] = qat
        swapped.append(target)
    gm.recompile()
    return swapped


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


def _prepare_graph(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    backend: Backend,
    qconfig: QConfig,
    mode: str,
    skip: Skip,
    leaf_modules: Sequence[type | str],
    concrete_args: dict[str, Any] | None,
    preserved_attributes: Sequence[str],
    exact: bool,
) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    gm = trace(module, leaf_modules, concrete_args, preserved_attributes)
    fuse(gm, fusion_patterns(), mode)
    _swap_qat_modules(gm, qconfig, skip, exact)
    _propagate_shapes(gm, example_inputs)
    ann = annotate(gm, backend.placement, skip)
    materialize(gm, ann, qconfig.activation, exact)
    gm.train(module.training)
    return gm, _placement_table(ann)


def _submodule_inputs(model: nn.Module, names: Sequence[str], example_inputs: tuple[Any, ...]) -> dict[str, tuple]:
    """Run the float model once and record the positional inputs each named sub-module receives."""
    captured: dict[str, tuple] = {}
    hooks = []
    for name in names:
        try:
            sub = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"model has no sub-module {name!r} to quantize ({exc}).") from None
        hooks.append(sub.register_forward_pre_hook(lambda _m, args, n=name: captured.setdefault(n, args)))
    # Eval mode for this probe run: in QAT mode the model may be training, and a training-mode forward would
    # update every BatchNorm's running statistics with the example inputs before they are copied into QAT modules.
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    missing = [n for n in names if n not in captured]
    if missing:
        raise ConfigError(f"sub-modules {missing} are never called by the model's forward on example_inputs.")
    return captured


def prepare(
    model: nn.Module,
    backend: Backend | str,
    example_inputs: Any,
    qconfig: QConfig | QConfigPreset | str | None = None,
    mode: str = "ptq",
    *,
    modules: Sequence[str] | None = None,
    skip: Iterable[str | type | Callable[..., Any]] = (),
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    preserved_attributes: Sequence[str] = (),
    exact: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Prepare ``model`` for ``backend``: the returned model simulates the target's quantization.

    Args:
        model: the float model (not modified unless ``inplace``).
        backend: a ``Backend`` or its name/alias.
        example_inputs: a tensor or tuple of tensors the model's forward accepts (used for tracing checks and
            shape propagation).
        qconfig: ``None`` for the backend's default, a preset name (``"w4a4"``), a preset or a full QConfig.
        mode: ``"ptq"`` (BN folded now, model in eval mode) or ``"qat"`` (BN kept and its folding simulated).
        modules: quantize only these sub-modules (qualified names, e.g. ``["backbone"]``).
        skip: layers to leave in float: module names, module types or functions (e.g. ``["conv1", "fc"]``).
        leaf_modules: module types or names that tracing must not enter (they stay float).
        concrete_args, preserved_attributes: passed to the tracer / copied onto the GraphModule.
        exact: use the division-based rounding that matches ONNX Runtime bit for bit (see docs/design.md).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare() needs an nn.Module, got {type(model).__name__}.")
    backend = get_backend(backend)
    resolved = backend.resolve_qconfig(qconfig)
    inputs = as_inputs(example_inputs)
    skip_items = list(skip)
    skipper = Skip.build(skip_items)
    root = model if inplace else copy.deepcopy(model)
    if mode == "ptq":
        root.eval()
    common = dict(backend=backend, qconfig=resolved, mode=mode, skip=skipper, leaf_modules=leaf_modules,
                  concrete_args=concrete_args, preserved_attributes=preserved_attributes, exact=exact)
    placements: dict[str, list[dict[str, Any]]] = {}
    if modules:
        sub_inputs = _submodule_inputs(root, modules, inputs)
        for name in modules:
            sub = root.get_submodule(name)
            gm, placements[name] = _prepare_graph(sub, sub_inputs[name], **common)
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, gm)
        result = root
    else:
        result, placements[""] = _prepare_graph(root, inputs, **common)
    result.mq_info = PrepareInfo(
        backend=backend.name,
        qconfig=resolved,
        mode=mode,
        modules=list(modules or []),
        skip=[object_ref(s) for s in skip_items],
        leaf_modules=[object_ref(s) for s in leaf_modules],
        exact=exact,
        placements=placements,
    )
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module from its graph and drops plain attributes such as mq_info;
        # it re-attaches the ones listed under this meta key (as torch's own prepare_fx does).
        result.meta.setdefault(_PRESERVED_KEY, {})["mq_info"] = result.mq_info
    log.info("prepared %s for %s (%s, %s)", type(model).__name__, backend.name, resolved.name, mode)
    return result


def object_ref(obj: Any) -> str:
    """A skip/leaf item as plain text for ``PrepareInfo``: names stay as they are; a type or function becomes
    ``"module:qualname"`` (a ':' never occurs in a module name), so that ``checkpoint.restore`` can import it
    again. Recording only ``__qualname__`` ("Linear") made a restored model treat it as a module name."""
    if isinstance(obj, str):
        return obj
    module = getattr(obj, "__module__", None)
    for attr in ("__qualname__", "__name__"):
        name = getattr(obj, attr, None)
        if module and name and resolve_ref(f"{module}:{name}") is obj:
            return f"{module}:{name}"
    return repr(obj)


def resolve_ref(ref: str) -> Any:
    """The type or function named by ``object_ref``'s ``"module:qualname"``; None when it cannot be imported."""
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj


def prepare_info(qmodel: nn.Module) -> PrepareInfo:
    """The ``PrepareInfo`` of a prepared model; a clear error for a model that was never prepared."""
    info = getattr(qmodel, "mq_info", None)
    if not isinstance(info, PrepareInfo):
        raise ConfigError("this model was not prepared by mq; call mq.prepare(model, backend, example_inputs) first.")
    return info
