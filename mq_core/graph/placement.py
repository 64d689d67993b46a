"""Activation quantizer placement: annotate the graph from a backend's policy, then materialise quantizers.

Two steps, as in torchao's pt2e design:

1. ``annotate`` reads the ``PlacementPolicy`` and decides, per tensor (fx node output), whether it is quantized
   and for which consumers (all of them, or only the ops that asked for a quantized input). The result is a plain
   table (``QuantizedTensor`` records), easy to inspect and test.
2. ``materialize`` inserts exactly one fake quantizer per quantized tensor and rewires the consumers.

So one tensor never gets two quantizers, policies stay data, and the graph rewriting lives here only.

One rule holds for every backend: an additive attention mask (``finfo.min`` where attention is masked) and every
tensor computed from it before the softmax (``ops.masked_tensors``) is never quantized, and an op that reads one
gets no input quantizers: a grid over +-3.4e38 has a step of 1e36 and would zero every score. Under output
placement the scores are quantized before the mask is added; under input placement (TensorRT) the attention
matmuls keep their quantized inputs (Q, Kᵀ, softmax output, V) and the score + mask addition stays float.

Under input placement, a backend may keep float the inputs of an element-wise op whose result a norm reads
(``PlacementPolicy.eltwise_before_norm``; OpenVINO, whose int8 pipeline otherwise computes a different LayerNorm).

Under output placement, a backend may name op kinds its runtime executes in float (``PlacementPolicy.float_kinds``;
ONNX Runtime: LayerNorm, GELU). Placement then decides from the network's outputs backwards which readers consume
each tensor in integer (``_integer_readers``) and quantizes the tensor for those readers only: a post-LN
transformer's residual stream (the sums a LayerNorm reads, the FFN output feeding them, the LayerNorm output feeding
the next residual add) stays float, while every Linear/MatMul input is quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from mq_core.graph.capture import SCOPE_META
from mq_core.graph.ops import is_float_tensor, masked_tensors, op_kind, produces_nonnegative, tensor_args
from mq_core.graph.policy import INTEGER_INPUT_KINDS, PlacementPolicy
from mq_core.nn.fused import FusedModule
from mq_core.quant.qconfig import QuantizerSpec

log = logging.getLogger(__name__)


@dataclass
class QuantizedTensor:
    """One tensor to quantize: its producer node and the consumers that read the quantized version."""

    producer: fx.Node
    consumers: list[fx.Node] | None = None  # None: every consumer
    unsigned: bool = False
    reason: str = ""
    quantizer: str = ""  # module name, set by materialize

    def add_consumer(self, node: fx.Node) -> None:
        if self.consumers is not None and node not in self.consumers:
            self.consumers.append(node)


@dataclass
class Skip:
    """Layers left in float: by module qualified name / fx node name, module type, or function."""

    names: frozenset[str] = frozenset()
    types: tuple[type, ...] = ()
    functions: frozenset[Any] = frozenset()

    @classmethod
    def build(cls, items: Iterable[str | type | Callable[..., Any]]) -> Skip:
        items = list(items)
        return cls(
            names=frozenset(i for i in items if isinstance(i, str)),
            types=tuple(i for i in items if isinstance(i, type)),
            functions=frozenset(i for i in items if callable(i) and not isinstance(i, type)),
        )

    def __call__(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        if node.name in self.names:
            return True
        # an ATen op of a torch.export graph, inside a named module (`skip=["encoder.layer.0"]`)
        if any(s == n or s.startswith(n + ".") for s in node.meta.get(SCOPE_META, ()) for n in self.names):
            return True
        if node.op == "call_module":
            target = str(node.target)
            if any(target == n or target.startswith(n + ".") for n in self.names):
                return True
            # A fused container (Conv -> BN -> ReLU) is skipped as the layer it holds: skip=[nn.Conv2d] must keep a
            # fused conv float too, not only the convs that happened to have nothing to fuse with.
            module = modules[target]
            layer = module.layer if isinstance(module, FusedModule) else module
            return bool(self.types) and isinstance(layer, self.types)
        return node.op == "call_function" and node.target in self.functions


@dataclass
class Annotation:
    """The placement decision for a whole graph."""

    tensors: dict[fx.Node, QuantizedTensor] = field(default_factory=dict)
    #: tensors holding an additive attention mask: never quantized, nor are the other inputs of their readers
    masked: set[fx.Node] = field(default_factory=set)

    def request(self, producer: fx.Node, consumer: fx.Node | None, reason: str) -> QuantizedTensor | None:
        reads_mask = consumer is not None and any(a in self.masked for a in consumer.all_input_nodes)
        if producer in self.masked or reads_mask:
            return None
        record = self.tensors.get(producer)
        if record is None:
            record = self.tensors[producer] = QuantizedTensor(producer, None if consumer is None else [], reason=reason)
        elif consumer is None:
            record.consumers = None
        if consumer is not None:
            record.add_consumer(consumer)
        return record


def _source(node: fx.Node, modules: dict[str, nn.Module], policy: PlacementPolicy) -> fx.Node:
    """Follow pass-through ops back to the node that computed the values."""
    while op_kind(node, modules) in policy.passthrough and tensor_args(node):
        node = tensor_args(node)[0]
    return node


def annotate(gm: fx.GraphModule, policy: PlacementPolicy, skip: Skip) -> Annotation:
    """Decide which tensors get quantizers under ``policy`` (nothing is changed in the graph)."""
    modules = dict(gm.named_modules())
    ann = Annotation(masked=masked_tensors(gm, modules))
    if ann.masked:
        log.info("%d tensor(s) hold an additive attention mask or scores with it added (%s): left in float",
                 len(ann.masked), ", ".join(sorted(n.name for n in ann.masked))[:200])
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
    used_by = {n: [u for u in n.users if u.op != "output" and not skip(u, modules)] for n in nodes}

    plan = _integer_readers(nodes, modules, policy, skip, ann.masked) if policy.float_kinds else None
    if policy.network_inputs:
        for node in nodes:
            if node.op == "placeholder" and is_float_tensor(node) and used_by[node]:
                _request_for(ann, node, plan, "network input")

    for node in nodes:
        if node.op == "placeholder" or skip(node, modules) or not is_float_tensor(node):
            continue
        kind = op_kind(node, modules)
        if kind in policy.passthrough and not tensor_args(node):
            kind = "other"  # e.g. getitem on a tuple output: there is no input grid to pass through
        if kind in policy.quantize_inputs_of and not (
                kind in _ELTWISE and not policy.eltwise_before_norm and _feeds_norm(node, modules, policy)):
            for arg in tensor_args(node):
                if kind in _ELTWISE and arg.op == "get_attr":
                    continue  # a parameter added to an activation (ViT's position embeddings) is no residual input
                ann.request(arg, node, f"input of {kind}")
        if kind in policy.quantize_outputs_of:
            _annotate_output(node, kind, modules, policy, ann, skip, plan)
        elif plan is not None and _split_passthrough(node, kind, plan, policy):
            _request_for(ann, node, plan, f"output of {kind} read in float too")

    if policy.quantize_outputs_of and not policy.network_outputs:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for produced in tensor_args(output):
            # A network output reached through pass-through ops (``fc(x).flatten(1)``) has its quantizer on the
            # op before them: walk back along the chain while it feeds nothing but the output.
            chain = {produced}
            while (produced not in ann.tensors and op_kind(produced, modules) in policy.passthrough
                   and tensor_args(produced) and len(tensor_args(produced)[0].users) == 1):
                produced = tensor_args(produced)[0]
                chain.add(produced)
            record = ann.tensors.get(produced)
            if record is not None and record.reason.startswith("output") and set(used_by[produced]) <= chain:
                del ann.tensors[produced]

    if policy.unsigned_non_negative:
        for record in ann.tensors.values():
            record.unsigned = produces_nonnegative(record.producer, modules)
    return ann


#: Element-wise ops whose inputs input placement may quantize (see ``PlacementPolicy.eltwise_before_norm``).
_ELTWISE = frozenset({"add", "sub", "mul", "div"})


def _feeds_norm(node: fx.Node, modules: dict[str, nn.Module], policy: PlacementPolicy) -> bool:
    """Whether a norm reads ``node``'s result (looking through pass-through ops such as dropout)."""
    for user in node.users:
        kind = op_kind(user, modules) if user.op != "output" else "output"
        if kind == "norm" or (kind in policy.passthrough and _feeds_norm(user, modules, policy)):
            return True
    return False


def _has_reader(node: fx.Node, modules: dict[str, nn.Module], policy: PlacementPolicy, skip: Skip) -> bool:
    """Whether the network output or an op that is not skipped reads ``node``'s values (looking through
    pass-through ops). A skipped layer stays float: no output quantizer is placed only for it to read."""
    for user in node.users:
        if user.op == "output":
            return True
        if skip(user, modules):
            continue
        if op_kind(user, modules) not in policy.passthrough or _has_reader(user, modules, policy, skip):
            return True
    return False


def _integer_readers(nodes: list[fx.Node], modules: dict[str, nn.Module], policy: PlacementPolicy, skip: Skip,
                     masked: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the readers that consume its output in integer under ``policy.float_kinds`` (the output node
    standing for the network output), decided backwards from the network's outputs: a Linear/MatMul/Conv reads in
    integer; a float kind, a skipped layer or a tensor holding an attention mask does not; any other op does when
    its own output is quantized (when it has such a reader itself, or is a network output), or when its result
    does not flow only into float kinds and masks (a *float sink*: a post-LN residual sum). Only float kinds and
    masks make float spread backwards: an op read only by a skipped layer (a classifier left in float) stays
    integer as under the plain rule, so leaving one layer in float does not turn the layers before it float. A
    pass-through op (dropout, reshape) read both ways carries the quantizer itself, for its integer readers only
    (``_split_passthrough``)."""
    readers: dict[fx.Node, list[fx.Node]] = {}
    float_sink: dict[fx.Node, bool] = {}

    def sinks_float(user: fx.Node) -> bool:
        if user.op == "output" or skip(user, modules):
            return False
        if user in masked:
            return True
        kind = op_kind(user, modules)
        return kind in policy.float_kinds or (float_sink[user] and kind not in INTEGER_INPUT_KINDS)

    def integer(user: fx.Node, producer_kind: str) -> bool:
        if user.op == "output":
            return policy.network_outputs and producer_kind not in policy.float_kinds
        if user in masked or skip(user, modules):
            return False
        kind = op_kind(user, modules)
        passthrough = kind in policy.passthrough and bool(tensor_args(user))
        if kind in policy.float_kinds or not (is_float_tensor(user) or passthrough):  # e.g. ``x.shape``
            return False
        if passthrough:  # on the grid of its input when all its readers are
            return bool(readers[user]) and len(readers[user]) == len(user.users)
        return kind in INTEGER_INPUT_KINDS or bool(readers.get(user)) or not float_sink[user]

    for node in reversed(nodes):  # every reader of a node comes after it
        kind = op_kind(node, modules)
        readers[node] = [user for user in node.users if integer(user, kind)]
        float_sink[node] = bool(node.users) and all(sinks_float(user) for user in node.users)
    return readers


def _split_passthrough(node: fx.Node, kind: str, plan: dict[fx.Node, list[fx.Node]], policy: PlacementPolicy) -> bool:
    """Whether pass-through ``node`` has integer readers and float readers (then the quantizer goes after it)."""
    return kind in policy.passthrough and bool(tensor_args(node)) and 0 < len(plan[node]) < len(node.users)


def _request_for(ann: Annotation, node: fx.Node, plan: dict[fx.Node, list[fx.Node]] | None, reason: str) -> None:
    """Quantize ``node`` for all its readers, or (with a plan of integer readers) for those the plan names."""
    if plan is None or set(plan[node]) == set(node.users):
        ann.request(node, None, reason)
        return
    for user in plan[node]:
        ann.request(node, user, reason)


def _annotate_output(
    node: fx.Node, kind: str, modules: dict[str, nn.Module], policy: PlacementPolicy, ann: Annotation, skip: Skip,
    plan: dict[fx.Node, list[fx.Node]] | None,
) -> None:
    """Output placement for one compute node, with activation merging and pass-through."""
    users = list(node.users)
    if kind in policy.merge_into_producer and tensor_args(node):
        if _source(tensor_args(node)[0], modules, policy) in ann.tensors:
            return  # ReLU of an already-quantized tensor stays on its grid (pass-through)
    if len(users) == 1 and users[0].op != "output" and op_kind(users[0], modules) in policy.merge_into_producer:
        return  # the following ReLU/ReLU6 carries this tensor's quantizer
    if not (_has_reader(node, modules, policy, skip) if plan is None else plan[node]):
        return
    _request_for(ann, node, plan, f"output of {kind}")


def materialize(
    gm: fx.GraphModule, ann: Annotation, spec: QuantizerSpec | Callable[[QuantizedTensor], QuantizerSpec],
    build: Callable[[QuantizerSpec], nn.Module],
) -> dict[str, nn.Module]:
    """Insert one fake quantizer per annotated tensor; returns {module name: quantizer}.

    ``spec`` is one spec for every tensor, or a function giving each tensor's (per-layer qconfigs, see
    ``mq_core.graph.layer_qconfig``). ``build`` turns a spec into a quantizer (the caller resolves observer and
    quantizer names: the graph layer never looks names up). A tensor known to be non-negative gets the unsigned
    variant of a signed spec.
    """
    created: dict[str, nn.Module] = {}
    for producer, record in ann.tensors.items():
        qspec = spec(record) if callable(spec) else spec
        if record.unsigned and qspec.scheme.signed:
            qspec = qspec.replace(scheme=qspec.scheme.replace(signed=False, narrow_range=False))
        fq = build(qspec)
        name = _free_name(gm, f"{producer.name}_fq")
        fq.qname = name
        fq.tensor = producer.name
        fq.role = "activation"
        gm.add_submodule(name, fq)
        consumers = list(producer.users) if record.consumers is None else list(record.consumers)
        with gm.graph.inserting_after(producer):
            qnode = gm.graph.call_module(name, (producer,))
        for consumer in consumers:
            consumer.replace_input_with(producer, qnode)
        qnode.meta = {k: v for k, v in producer.meta.items() if k == "tensor_meta"}
        record.quantizer = name
        created[name] = fq
    gm.graph.lint()
    gm.recompile()
    return created


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate
