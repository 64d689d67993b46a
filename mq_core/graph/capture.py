"""Capture: the model as an fx graph, by symbolic tracing (torch.fx) or by ``torch.export``, and errors a user can
act on.

Both front-ends give the same kind of graph, so fusion, QAT swap, placement, export and verification are shared:
modules fx keeps as leaves (``nn.Conv2d``, ``nn.Linear``, ``nn.LayerNorm``, user leaves, ...) are ``call_module``
nodes, the rest are ``call_function`` nodes whose targets ``mq_core.graph.ops`` maps onto op kinds.

fx (``trace``):

* Leaf modules: user-named (by type or qualified name) plus every module mq owns (fake quantizers, fused and QAT
  modules) stay single nodes.
* Eager-mode quantization models run unchanged: ``QuantStub``/``DeQuantStub`` trace through as identities and
  ``FloatFunctional``/``FXFloatFunctional`` calls become plain ``torch.add``/``torch.cat``/... nodes (their
  ``activation_post_process`` identity is dropped). They are recognised by class name: mq never imports
  torch.ao.
* A failure names the module being traced and the user's source line, and says how to fix it.

torch.export (``export_trace``), for models fx cannot trace (HuggingFace transformers: data-dependent slicing,
branches on ``attention_mask.ndim``, ``**kwargs`` plumbing):

* ``torch.export.export(strict=False)`` runs the real Python code with symbolic shapes and records ATen ops.
  The batch dimension of every tensor input and the sequence dimension (dim 1) of integer inputs (token ids,
  attention masks) are dynamic; everything else is specialised to the example inputs.
* Every module fx would keep as a leaf and whose ops form one region with one tensor in and one tensor out (its
  ``nn_module_stack`` in the node metadata) is collapsed back into a ``call_module`` of the original module: the
  graph then looks like fx's, BN folding and the Conv/Linear patterns work unchanged, and weights stay in their
  modules (no weight quantizers on loose parameters). A leaf with several tensor inputs (``nn.MultiheadAttention``)
  stays as ATen ops.
* HuggingFace ``Conv1D`` (GPT-2's projections, ``x @ W + b`` with ``W`` stored ``[in, out]``) is not a torch.nn
  layer: ``linears_from_conv1d`` replaces it by the equivalent ``nn.Linear`` (``W`` transposed) before capture, on
  both front-ends, so it is fused, weight-quantized per output channel and exported as any Linear.
* Shape guards and dtype asserts of the exported program are dropped (calibration data may use int32 ids); the
  graph takes its inputs flat, in the order of the example inputs, by position or by name, and returns its
  outputs flattened (a HuggingFace ``ModelOutput`` becomes a tuple in its field order).
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mq_core.errors import TraceError
from mq_core.nn.bn_fold import is_frozen_batch_norm
from mq_core.quiet import silenced

#: Eager-mode quantization stubs (torch.ao) that are identities in a float model.
_STUB_CLASSES = frozenset({"QuantStub", "DeQuantStub", "QuantWrapper"})
_TORCH_DIR = str(Path(torch.__file__).parent)
_MQ_DIR = str(Path(__file__).parents[1])
#: Node meta key holding the qualified names of the modules an ATen node of an exported graph was computed in
#: (outermost first); ``Skip`` reads it, so ``skip=["encoder.layer.0"]`` also keeps loose ops there float.
SCOPE_META = "mq_scope"
#: GraphModule.meta key of an exported graph: the dynamic dimensions of each input, ``[{dim: name}]``, and the
#: bounds of each name, ``{name: (min, max or None)}``.
DYNAMIC_META = "mq_dynamic_dims"
DIM_BOUNDS_META = "mq_dim_bounds"
#: Nodes an exported program carries to check its inputs; a prepared model is checked by calibrate/verify instead.
_CHECKS = frozenset({torch.ops.aten._assert_tensor_metadata.default})
#: Functional dropouts (as fx and torch.export record them) and the names of their arguments, in order.
_FUNCTIONAL_DROPOUTS: dict[Any, tuple[str, ...]] = {
    F.dropout: ("input", "p", "training", "inplace"),
    torch.dropout: ("input", "p", "train"),
    torch.ops.aten.dropout.default: ("input", "p", "train"),
}


class MQTracer(fx.Tracer):
    """fx tracer with user leaf modules, mq's own leaves, and a record of the module being traced."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self.leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self.leaf_names = frozenset(t for t in leaves if isinstance(t, str))
        self.mq_module_stack: list[str] = []
        #: innermost module whose forward raised while tracing (the stack is unwound by the time trace() sees it)
        self.mq_failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if type(m).__name__ in _STUB_CLASSES:
            return False
        if getattr(m, "mq_leaf", False):
            return True
        if _looks_frozen_bn(m):
            # Frozen BNs (mq's and torchvision's FrozenBatchNorm2d) live outside torch.nn, so fx would trace them
            # into mul/add ops and the fusion patterns could never fold them into the preceding layer.
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.mq_module_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.mq_failed_module is None:
                self.mq_failed_module = path
            raise
        finally:
            self.mq_module_stack.pop()


def _is_hf_conv1d(m: nn.Module) -> bool:
    """HuggingFace's ``transformers.pytorch_utils.Conv1D``, recognised without importing transformers."""
    return (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")
            and isinstance(getattr(m, "nf", None), int) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2)


def linears_from_conv1d(root: nn.Module) -> list[str]:
    """Replace, in ``root``, every HuggingFace ``Conv1D`` by the ``nn.Linear`` computing the same (its weight
    transposed to ``[out, in]``, the same bias, training flag and ``requires_grad``); returns their qualified names.

    Why: a ``Conv1D`` computes ``addmm(b, x, W)`` on a weight laid out ``[in, out]``; left as it is, capture sees a
    loose matmul on a parameter, which gets no weight quantizer (GPT-2's projections stayed float). As a Linear it is
    captured, fused, weight-quantized (per output channel) and exported like every other Linear. The state dict of the
    prepared model holds the Linear's (transposed) weights; ``restore`` converts the float model the same way.
    """
    names = [name for name, m in root.named_modules() if name and _is_hf_conv1d(m)]
    for name in names:
        old = root.get_submodule(name)
        weight = old.weight
        bias = getattr(old, "bias", None)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            linear.bias.requires_grad_(bias.requires_grad)
        linear.train(old.training)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, linear)
    return names


def _looks_frozen_bn(m: nn.Module) -> bool:
    """``is_frozen_batch_norm``, checking the module's own buffers first: while tracing, ``hasattr(m, "weight")``
    on a module whose weight is a Parameter makes fx record a (dangling) get_attr node."""
    return "running_mean" in m._buffers and "momentum" not in m.__dict__ and is_frozen_batch_norm(m)


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch and mq, where the untraceable code lives."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith((_TORCH_DIR, _MQ_DIR))]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def trace(
    root: nn.Module,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    preserved_attributes: Sequence[str] = (),
) -> fx.GraphModule:
    """Trace ``root`` into a GraphModule, or raise ``TraceError`` explaining where and how to fix it."""
    tracer = MQTracer(leaf_modules)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:
        where = tracer.mq_failed_module or None
        module_text = f"inside module '{where}'" if where else f"in {type(root).__name__}.forward"
        line = _user_frame(exc)
        leaf_hint = f'leaf_modules=["{where}"]' if where else "leaf_modules=[<module name or type>]"
        raise TraceError(
            f"torch.fx could not trace {type(root).__name__} {module_text}"
            + (f" at {line}" if line else "")
            + f": {type(exc).__name__}: {exc}. This usually means data-dependent Python control flow or an "
            f"untraceable call. Fix: keep that module in float as a leaf ({leaf_hint}, CLI --leaf-module), "
            "pass concrete_args for Python-level switches, or quantize only a traceable sub-module "
            '(modules=["backbone"], CLI --module).'
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(root).__name__)
    _drop_identities(gm)
    dropouts_follow_mode(gm)
    _copy_preserved(gm, root, preserved_attributes)
    return gm


def _copy_preserved(gm: fx.GraphModule, root: nn.Module, preserved_attributes: Sequence[str]) -> None:
    """Copy ``preserved_attributes`` of ``root`` onto ``gm`` (listed in its meta, they survive copy.deepcopy, which
    rebuilds a GraphModule from its graph)."""
    for attr in preserved_attributes:
        if not hasattr(root, attr):
            raise TraceError(f"preserved attribute {attr!r} does not exist on {type(root).__name__}.")
        setattr(gm, attr, getattr(root, attr))
        key = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
        gm.meta.setdefault(key, {})[attr] = getattr(root, attr)


def _drop_identities(gm: fx.GraphModule) -> None:
    """Remove ``nn.Identity`` calls (FloatFunctional's activation_post_process, placeholder heads)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules.get(str(node.target))) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def dropouts_follow_mode(gm: fx.GraphModule) -> list[str]:
    """Replace each functional dropout of ``gm`` (``F.dropout(x, p, training=self.training)``, HuggingFace's attention
    dropout, ``aten.dropout`` in a torch.export graph) by an ``nn.Dropout(p)`` module; returns the new modules' names.

    Why: capture records the ``training`` flag the model had at that moment as a constant. A model captured in train
    mode for QAT kept dropping out after ``qmodel.eval()``, so evaluation, export and verification saw random
    outputs; one captured in eval mode would never drop out in QAT training. As a module the dropout follows
    ``qmodel.train()``/``eval()``, as the float model's code does; until then it does what it did at capture. A
    dropout whose ``p`` is not a constant stays.
    """
    names = []
    for node in list(gm.graph.nodes):
        params = _FUNCTIONAL_DROPOUTS.get(node.target) if node.op == "call_function" else None
        if params is None:
            continue
        bound = dict(zip(params, node.args, strict=False)) | dict(node.kwargs)
        p = bound.get("p", 0.5)
        if not isinstance(bound.get("input"), fx.Node) or isinstance(p, bool) or not isinstance(p, (int, float)):
            continue
        name, k = f"{node.name}_module", 1
        while hasattr(gm, name):
            name, k = f"{node.name}_module{k}", k + 1
        training = bound.get("training", bound.get("train", True))
        gm.add_submodule(name, nn.Dropout(float(p)).train(training if isinstance(training, bool) else True))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (bound["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        names.append(name)
    if names:
        gm.recompile()
    return names


def _dynamic_dims(value: Any) -> dict[int, Any] | None:
    """Which dimensions of one example input torch.export treats as dynamic: the batch of a tensor, and the
    sequence (dim 1) of an integer tensor (token ids, attention masks)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if value.dim() >= 2 and not (value.dtype.is_floating_point or value.dtype.is_complex):
        dims[1] = torch.export.Dim.AUTO
    return dims


def _leaf_regions(gm: fx.GraphModule, root: nn.Module, tracer: MQTracer) -> dict[str, tuple[str, list[fx.Node]]]:
    """The ATen nodes of each call of a module fx would keep as a leaf: {nn_module_stack key: (path, nodes)}. A node
    belongs to the outermost such module it was computed in."""
    regions: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _type) in (node.meta.get("nn_module_stack") or {}).items():
            if not path:
                continue
            try:
                module = root.get_submodule(path)
            except AttributeError:
                continue
            if tracer.is_leaf_module(module, path):
                regions.setdefault(key, (path, []))[1].append(node)
                break
    return regions


def _one_input(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes one required argument (``nn.MultiheadAttention(q, k, v)`` takes three,
    even when called with one tensor three times): only such a module can stand for one region of the graph."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _collapse(gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> bool:
    """Replace one module call's nodes by ``call_module(path, (input,))`` when they read one tensor from outside
    (parameters and shape values aside) and one of them is read outside; returns whether it did."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                                if a not in inside and a.op != "get_attr" and _is_tensor(a)))
    results = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(results) != 1 or not _is_tensor(results[0]):
        return False
    result = results[0]
    with gm.graph.inserting_before(result):
        call = gm.graph.create_node("call_module", path, (inputs[0],))
    call.meta = {k: v for k, v in result.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
    result.replace_all_uses_with(call)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return True


def _scope(node: fx.Node) -> tuple[str, ...]:
    return tuple(path for path, _type in (node.meta.get("nn_module_stack") or {}).values() if path)


def export_trace(
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Iterable[type | str] = (),
    preserved_attributes: Sequence[str] = (),
) -> fx.GraphModule:
    """Capture ``root`` with ``torch.export`` into a GraphModule shaped like fx's (see the module docstring), or
    raise ``TraceError`` saying why."""
    tracer = MQTracer(leaf_modules)
    flat = [*args, *kwargs.values()]
    dynamic = tuple(_dynamic_dims(v) for v in flat)
    name = type(root).__name__
    try:
        with silenced("torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                      "torch._subclasses", "torch._functorch"):
            program = torch.export.export(root, tuple(args), dict(kwargs), dynamic_shapes=dynamic, strict=False)
            unlifted = program.module()
    except Exception as exc:
        raise TraceError(
            f"torch.export could not capture {name}: {describe_trace_failure(exc)}. Fix: pass example inputs the "
            "model runs on, rewrite data-dependent branches with torch.where/torch.cond, or quantize only a "
            'sub-module that exports (modules=["encoder"], CLI --module).'
        ) from exc
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(unlifted.graph, copied)
    spec = getattr(unlifted, "_out_spec", None)
    if spec is not None and spec.is_leaf() and isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    graph.output(out if not isinstance(out, list) else tuple(out))
    for node in list(graph.nodes):
        if node.op == "call_module" or (node.op == "call_function" and node.target in _CHECKS):
            graph.erase_node(node)  # `_guards_fn` and dtype asserts: see the module docstring
    staging = fx.GraphModule(unlifted, graph, name)
    for path, nodes in _leaf_regions(staging, root, tracer).values():
        module = root.get_submodule(path)
        named = path in tracer.leaf_names or (bool(tracer.leaf_types) and isinstance(module, tracer.leaf_types))
        if not (_one_input(module) and _collapse(staging, path, nodes)) and named:
            raise TraceError(
                f"leaf module {path!r} ({type(module).__name__}) cannot stay a single call in the "
                "torch.export graph: its ops read more than one tensor or give more than one result. Leave it out "
                "of leaf_modules (it is then captured op by op) or skip it (skip=[...])."
            )
    for node in list(staging.graph.nodes):
        if node.op == "get_attr" and not node.users:  # the weights of collapsed modules
            staging.graph.erase_node(node)
    attrs: dict[str, Any] = {}
    for node in staging.graph.nodes:
        if node.op == "get_attr":
            attrs[str(node.target)] = _attribute(unlifted, str(node.target))
        elif node.op == "call_module":
            attrs[str(node.target)] = root.get_submodule(str(node.target))
        elif node.op == "call_function":
            node.meta[SCOPE_META] = _scope(node)
    gm = fx.GraphModule(attrs, staging.graph, name)
    gm.graph.eliminate_dead_code()  # shape computations only the collapsed regions read
    dropouts_follow_mode(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    gm.meta[DYNAMIC_META], gm.meta[DIM_BOUNDS_META] = _dim_names(placeholders, program)
    _copy_preserved(gm, root, preserved_attributes)
    gm.graph.lint()
    gm.recompile()
    return gm


def _attribute(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _dim_names(placeholders: list[fx.Node], program: Any) -> tuple[list[dict[int, str]], dict[str, tuple]]:
    """Names for the dynamic dimensions of the inputs, one per symbol: "batch" for a symbol first seen as a
    dimension 0, "sequence" for one first seen as a dimension 1, ``dim<k>`` otherwise; and each name's bounds."""
    names: dict[Any, str] = {}
    bounds: dict[str, tuple[int, int | None]] = {}
    per_input: list[dict[int, str]] = []
    for node in placeholders:
        val = node.meta.get("val")
        dims: dict[int, str] = {}
        for d, size in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if not isinstance(size, torch.SymInt):
                continue
            symbol = size.node.expr
            if symbol not in names:
                base = {0: "batch", 1: "sequence"}.get(d, f"dim{d}")
                label, k = base, 2
                while label in bounds:
                    label, k = f"{base}{k}", k + 1
                names[symbol] = label
                ranges = program.range_constraints.get(symbol)
                bounds[label] = (_bound(ranges.lower if ranges is not None else None) or 0,
                                 _bound(ranges.upper if ranges is not None else None))
            dims[d] = names[symbol]
        per_input.append(dims)
    return per_input, bounds


def _bound(value: Any) -> int | None:
    """A range bound of torch's symbolic shapes as an int (None when infinite or unknown)."""
    try:
        return int(value) if value is not None and bool(value.is_finite) else None
    except (TypeError, ValueError, AttributeError):
        return None


def describe_trace_failure(exc: BaseException) -> str:
    """One line for a torch.export failure: the innermost cause and the user's line where torch says it."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    first = next((line.strip() for e in reversed(chain) for line in str(e).splitlines() if line.strip()),
                 type(exc).__name__)
    line = _user_frame(chain[-1])
    return f"{type(chain[-1]).__name__}: {first[:300]}" + (f" (at {line})" if line else "")
