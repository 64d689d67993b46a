"""The canonical QDQ ONNX: the deploy view exported with torch's dynamo exporter, then cleaned up.

Every backend exporter starts from this model. Guarantees:

* opset 18+, static shapes with a dynamic batch dimension (``batch``; torch.export captures also ``sequence``,
  the length of token-id inputs), shape-inferred;
* weights as integer initializers + DequantizeLinear, scales and zero points as initializers (no arithmetic);
* readable, stable names: a quantized tensor is named after the prepared graph's node that produces it (the
  same name as in ``qmodel.mq_info.placements`` and in the manifest), its Q/DQ nodes after it;
* deterministic bytes: no stack traces or file paths in metadata.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from mq_core._version import __version__
from mq_core.errors import ExportError
from mq_core.export.deploy import DeployLayer, DeployQuantizer, deploy_view
from mq_core.export.onnx_graph import Graph, make_node
from mq_core.export.ops import TRANSLATIONS
from mq_core.export.ranges import QuantTable, TensorQuant
from mq_core.quiet import silenced

log = logging.getLogger(__name__)

OPSET = 18
_TORCH_DIR = str(Path(torch.__file__).parent)
_MQ_DIR = str(Path(__file__).parents[1])
_SCOPES = "pkg.torch.onnx.name_scopes"


def quiet_exporter() -> contextlib.AbstractContextManager[None]:
    """The dynamo exporter logs progress and optional-dependency notes on loggers/warnings, and prints pages of
    graph on stderr when it fails: keep them quiet (a failure becomes one ExportError paragraph). Public for
    scripts that export a float reference model with torch.onnx themselves (the benchmarks)."""
    return silenced("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir",
                    "torch.fx.experimental.symbolic_shapes")


def input_names(model: nn.Module, count: int) -> list[str]:
    graph = getattr(model, "graph", None)
    if graph is not None:
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
    else:
        names = [p for p in inspect.signature(model.forward).parameters if p not in ("self",)]
    return names[:count] if len(names) >= count else [f"input_{i}" for i in range(count)]


def dynamic_shapes(qmodel: nn.Module, count: int) -> tuple[dict[int, Any], ...]:
    """The dynamic dimensions of each of the ``count`` inputs, as prepare recorded them (``mq_info.inputs[i]
    ["dynamic"]``, ``{dim: name}``; one ``Dim`` per name, so a size shared by several inputs stays one symbol, with
    the bounds the capture found), else the batch: what becomes the ONNX graph's named dimensions."""
    info = getattr(qmodel, "mq_info", None)
    specs = list(getattr(info, "inputs", None) or [])
    bounds = dict(getattr(info, "dim_bounds", None) or {})
    made: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in made:
            low, high = bounds.get(name, (None, None))
            made[name] = torch.export.Dim(name, min=low, max=high) if (low, high) != (None, None) else \
                torch.export.Dim(name)
        return made[name]

    shapes = []
    for i in range(count):
        spec = specs[i] if i < len(specs) else None
        named = (spec or {}).get("dynamic", {0: "batch"})
        shapes.append({int(d): dim(name) for d, name in named.items()})
    return tuple(shapes)


def _tensor_table(deploy: nn.Module) -> QuantTable:
    """Ranges table keyed by the names the tensors will carry in the ONNX (tensor names, weight FQNs)."""
    table: QuantTable = {}
    for path, module in deploy.named_modules():
        if isinstance(module, DeployQuantizer):
            name, kind, frozen, qname = module.tensor, "activation", module.frozen, module.qname
        elif isinstance(module, DeployLayer):
            name, kind, frozen, qname = f"{path}.weight", "weight", module.frozen, module.qname
        else:
            continue
        s = frozen.scheme
        table[name] = TensorQuant(
            name=name, kind=kind, quantizer=qname, bits=s.bits, signed=s.signed, symmetric=s.symmetric,
            qmin=s.qmin, qmax=s.qmax, axis=frozen.axis,
            scale=frozen.scale.numpy().astype(np.float32), zero_point=frozen.zero_point.numpy().astype(np.int64),
        )
    return table


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            return ast.literal_eval(prop.value)
    return []


def _free_names(graph: Graph, pairs: list, quantizers: dict[str, DeployQuantizer]) -> None:
    """Move exporter-chosen names out of the way of the names mq is about to give quantized tensors."""
    wanted = set()
    for q in quantizers.values():
        wanted |= {q.tensor, f"{q.tensor}_quantized", f"{q.tensor}_dequantized", f"{q.tensor}_quantized_clipped"}
    holders = {p.input for p in pairs if p.quantize is not None}
    existing = {o for n in graph.model.graph.node for o in n.output} | set(graph.initializers)
    for name in sorted(existing & wanted):
        if name in graph.outputs or (name in holders and any(q.tensor == name for q in quantizers.values())):
            continue
        k = 1
        while f"{name}_{k}" in existing or f"{name}_{k}" in wanted:
            k += 1
        graph.rename(name, f"{name}_{k}")
        existing.add(f"{name}_{k}")


def _split_shared_inputs(graph: Graph) -> set[str]:
    """Give each Q/DQ pair its own input tensor: the exporter merges the same op on the same input (``flatten(y)``
    in two heads) even when the quantizers after it differ (learned separately), leaving two pairs on one tensor,
    which can carry only one name. Every further pair reads the tensor through an Identity; returns the names of
    the Identity outputs (renamed later, with the Identity, after the pair's quantizer)."""
    taken = {o for n in graph.model.graph.node for o in n.output} | set(graph.initializers) | set(graph.inputs)
    seen: set[str] = set()
    splits: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for pair in graph.qdq_pairs():
        if pair.quantize is None:
            continue
        source = pair.input
        if source not in seen:
            seen.add(source)
            continue
        k = 1
        while f"{source}_{k}" in taken:
            k += 1
        copy = f"{source}_{k}"
        taken.add(copy)
        pair.quantize.input[0] = copy
        splits.append((pair.quantize, make_node("Identity", [source], [copy], name=f"{copy}_Identity")))
    for quantize, identity in splits:
        graph.replace_nodes([quantize], [identity, quantize])
    return {identity.output[0] for _, identity in splits}


def _canonicalise(model: onnx.ModelProto, deploy: nn.Module, table: QuantTable) -> None:
    """Rename quantized tensors and Q/DQ nodes, check that every scale is a constant, drop volatile metadata."""
    graph = Graph(model)
    quantizers = {p: m for p, m in deploy.named_modules() if isinstance(m, DeployQuantizer)}
    layers = {p for p, m in deploy.named_modules() if isinstance(m, DeployLayer)}
    copies = _split_shared_inputs(graph)
    pairs = graph.qdq_pairs()
    _free_names(graph, pairs, quantizers)
    for pair in pairs:
        if not (graph.is_constant(pair.scale) and graph.is_constant(pair.zero_point)):
            raise ExportError(f"the exported graph computes the scale of {pair.output} at run time; mq exports "
                              "scales as constants only (this is a bug: please report it).")
        scopes = _scopes(pair.dequantize)
        if pair.quantize is None:  # a weight
            layer = next((s for s in reversed(scopes) if s in layers), None)
            if layer is None:
                raise ExportError(f"cannot attribute weight {pair.input} to a layer (this is a bug: please report it)")
            base = f"{layer}.weight"
            graph.rename(pair.input, base)
            graph.rename(pair.output, f"{base}_dequantized")
            pair.dequantize.name = f"{base}_DequantizeLinear"
            continue
        owner = next((quantizers[s] for s in reversed(scopes) if s in quantizers), None)
        if owner is None:
            raise ExportError(f"cannot attribute Q/DQ {pair.output} to a quantizer (this is a bug: please report it)")
        tensor = owner.tensor
        if pair.input in copies:
            graph.producer[pair.input].name = f"{tensor}_Identity"
        graph.rename(pair.input, tensor)
        if pair.output not in graph.outputs:
            graph.rename(pair.output, f"{tensor}_dequantized")
        graph.rename(pair.quantize.output[0], f"{tensor}_quantized")
        pair.quantize.name, pair.dequantize.name = f"{tensor}_QuantizeLinear", f"{tensor}_DequantizeLinear"
        if pair.clip is not None:
            graph.rename(pair.clip.output[0], f"{tensor}_quantized_clipped")
            pair.clip.name = f"{tensor}_Clip"
    missing = sorted(set(table) - set(graph.initializers) - {o for n in model.graph.node for o in n.output}
                     - set(graph.inputs))
    if missing:
        raise ExportError(f"quantized tensors missing from the exported graph: {missing}")
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    model.graph.doc_string = ""
    model.doc_string = ""
    model.producer_name, model.producer_version = "mq", __version__


_USER_CODE = re.compile(r"# File: (?P<file>[^\n]+?):(?P<line>\d+) in \w+, code: (?P<code>[^\n]+)")
_NOISE = ("This is step", "Modify the model", "Debug `torch", "Create an issue", "## ", "Failed to export")


def _export_failure(exc: BaseException) -> str:
    """One paragraph from torch's multi-page export error: the root cause, the user's line, and the fix."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    text = "\n".join(str(e) for e in chain)
    cause = next((line.strip() for e in reversed(chain) for line in str(e).splitlines()
                  if line.strip() and not line.strip().startswith(_NOISE)), type(exc).__name__)
    sites = [m for m in _USER_CODE.finditer(text) if not m["file"].startswith((_TORCH_DIR, _MQ_DIR))]
    where = f" at {sites[-1]['file']}:{sites[-1]['line']}: `{sites[-1]['code'].strip()}`" if sites else ""
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        fix = ("the model branches on tensor values, which no exported graph can express: rewrite the branch with "
               "torch.where (or torch.cond), or keep that part of the model outside the quantized model")
    else:
        fix = ("keep the layer that uses the unsupported op in float (prepare(..., skip=[...])) or outside the "
               "quantized sub-module (modules=[...])")
    return f"torch could not export the deploy graph to ONNX{where}: {cause[:300]}. Fix: {fix}."


def export_qdq_onnx(
    qmodel: nn.Module, example_inputs: tuple[torch.Tensor, ...], opset: int = OPSET
) -> tuple[onnx.ModelProto, QuantTable]:
    """Export the canonical QDQ ONNX of a calibrated prepared model, with its ranges table."""
    deploy = deploy_view(qmodel)
    table = _tensor_table(deploy)
    inputs = tuple(x if x.shape[0] > 1 else x.expand(2, *x.shape[1:]).contiguous() for x in example_inputs)
    names = input_names(qmodel, len(inputs))
    with torch.no_grad():
        outputs = deploy(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    dynamic = dynamic_shapes(qmodel, len(inputs))
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                deploy, inputs, dynamo=True, opset_version=opset, input_names=names, output_names=output_names,
                dynamic_shapes=dynamic, custom_translation_table=TRANSLATIONS, optimize=True, verbose=False,
                external_data=False,
            )
    except Exception as exc:
        raise ExportError(_export_failure(exc)) from exc
    model = program.model_proto
    _canonicalise(model, deploy, table)
    return onnx.shape_inference.infer_shapes(model, strict_mode=False), table
