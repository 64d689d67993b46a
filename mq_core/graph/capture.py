"""Capture: symbolic tracing with torch.fx, tuned for quantization, and errors a user can act on.

* Leaf modules: user-named (by type or qualified name) plus every module mq owns (fake quantizers, fused and QAT
  modules) stay single nodes.
* Eager-mode quantization models run unchanged: ``QuantStub``/``DeQuantStub`` trace through as identities and
  ``FloatFunctional``/``FXFloatFunctional`` calls become plain ``torch.add``/``torch.cat``/... nodes (their
  ``activation_post_process`` identity is dropped). They are recognised by class name: mq never imports
  torch.ao.
* A failure names the module being traced and the user's source line, and says how to fix it.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from mq_core.errors import TraceError
from mq_core.nn.bn_fold import is_frozen_batch_norm

#: Eager-mode quantization stubs (torch.ao) that are identities in a float model.
_STUB_CLASSES = frozenset({"QuantStub", "DeQuantStub", "QuantWrapper"})
_TORCH_DIR = str(Path(torch.__file__).parent)
_MQ_DIR = str(Path(__file__).parents[1])


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
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    _drop_identities(gm)
    for attr in preserved_attributes:
        if not hasattr(root, attr):
            raise TraceError(f"preserved attribute {attr!r} does not exist on {name}.")
        setattr(gm, attr, getattr(root, attr))
        # listed here, the attribute also survives copy.deepcopy (which rebuilds a GraphModule from its graph)
        key = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
        gm.meta.setdefault(key, {})[attr] = getattr(root, attr)
    return gm


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
