"""The reconstruction engine shared by AdaRound, BRECQ and QDrop.

For each unit (``mq_algos.ptq.blocks``), in graph order:

1. one pass over the calibration data (streamed, batch by batch) caches the unit's inputs from the *quantized*
   model, with every earlier unit already reconstructed (BRECQ's asymmetric reconstruction), and the unit's outputs
   from the *float* model (a copy of the prepared model with all quantizers off, taken before any weight changes)
   as targets, both from the same batch, so a shuffling DataLoader still pairs them right;
2. learn AdaRound rounding variables for the unit's weight layers (and, optionally, LSQ step sizes of the
   activation quantizers inside it, their learning rate cosine-decayed to 0 as in the reference code) with Adam,
   minimising ``rec + lambda * sum(1 - |2h - 1|^beta)``. QDrop leaves each activation element unquantized with
   probability 1 - p; at the unit's inputs the unquantized value is the float model's (as in the QDrop reference
   code, which mixes the quantized and the float block inputs), inside the unit the quantized model's own;
3. bake the hard rounding into the layer weights and write the learned activation scales back.

Memory: no batch is kept; what is held is one unit's cache, ``N * 4 bytes * (sum of the unit's input sizes + sum
of its output sizes [+ the input sizes again for QDrop])`` per sample size on the model's device, freed before the
next unit, plus a float copy of the model's weights (docs/algorithms.md, "Streaming and memory", has a measured
ResNet-18 block). The first unit concatenates its batches once (twice its cache for a moment); later units know
``N`` and fill one preallocated tensor.

Under ``torch.distributed`` (``data.group``) each rank caches its own shard and the gradients of every step are
averaged across the ranks before Adam's update (data-parallel reconstruction): every rank takes the same steps
from the same start, so all end with the same rounding, learned from the union of the shards with ``batch_size``
samples per rank and step.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from tqdm.auto import tqdm

from mq_algos.ptq.activations import ActivationPatch, patched, uses_fixed_forward
from mq_algos.ptq.blocks import Granularity, Unit, discover_units
from mq_algos.ptq.rounding import AdaRoundWeight, bake
from mq_core.plugin_api import (
    CalibrationData,
    ConfigError,
    FakeQuantizer,
    SchemeError,
    all_reduce,
    disable_all,
    num_inputs,
    run_batch,
)

log = logging.getLogger(__name__)

#: Widest weight grid whose rounding is learned: above 8 bits a rounding step is below the float noise of the
#: reconstruction loss, and ONNX export stops at 8 bits anyway.
MAX_WEIGHT_BITS = 8
#: Samples per forward pass when measuring a unit's error before and after reconstruction (a batch's worth: at
#: 224x224 the activations of a larger chunk would outgrow the cache itself).
_EVAL_CHUNK = 32


@dataclass(frozen=True)
class ReconstructionConfig:
    """Options shared by the reconstruction methods; the defaults are the documented defaults.

    Attributes:
        iterations: Adam steps per unit. The papers use 20000 (ImageNet); 1000 keeps a run of the small demo
            models to seconds per unit on a CPU.
        batch_size: samples per step, drawn without replacement from the cached calibration samples (paper: 32).
        lr: Adam learning rate of the rounding variables V. The papers use 1e-3 with 20000 steps; an Adam step
            moves V by about ``lr``, and V must travel ~2.4 from its start to saturate h at 0 or 1, so 1000 steps
            at 1e-3 end with most of the rounding still soft and the hard rounding can come out worse than
            nearest rounding. 1e-2 lets the annealing finish in the default 1000 steps (raise ``iterations`` and
            lower ``lr`` together to follow the papers).
        reg_lambda: weight lambda of the rounding regulariser sum(1 - |2h - 1|^beta) (paper: 0.01). The
            reconstruction error is the squared error summed over channels and averaged over samples and positions,
            the normalisation lambda was chosen for in the reference code.
        beta_start, beta_end: the regulariser's exponent, decayed linearly from start to end after the warm-up.
        warmup: fraction of the iterations with no regulariser (only the reconstruction error), as in the papers.
        learn_activation_scale: also learn the step sizes of the unit's activation quantizers with LSQ
            (fixed, non power-of-two quantizers only; the zero point is kept).
        activation_lr: Adam learning rate of those step sizes (BRECQ/QDrop: 4e-5).
        seed: seeds the sample order and QDrop's drop masks.
    """

    iterations: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learn_activation_scale: bool = False
    activation_lr: float = 4e-5
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, "iterations must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.lr > 0 and self.activation_lr > 0, "lr and activation_lr must be positive"),
            (self.reg_lambda >= 0, "reg_lambda must be non-negative"),
            (0 < self.beta_end <= self.beta_start, "need 0 < beta_end <= beta_start"),
            (0 <= self.warmup < 1, "warmup is a fraction of the iterations in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{type(self).__qualname__}: {message}.")


def beta_at(step: int, config: ReconstructionConfig) -> float | None:
    """The regulariser's exponent at ``step``; None during the warm-up (no regulariser)."""
    start = int(config.warmup * config.iterations)
    if step < start:
        return None
    progress = (step - start) / max(config.iterations - start, 1)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - progress)


def reconstruction_error(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over samples and positions, summed over outputs."""
    total = outputs[0].new_zeros(())
    for out, target in zip(outputs, targets):
        err = (out - target).pow(2)
        total = total + (err.sum(1).mean() if err.dim() > 1 else err.mean())
    return total


def _graph_module(qmodel: nn.Module) -> fx.GraphModule:
    if not isinstance(qmodel, fx.GraphModule):
        raise ConfigError(
            "PTQ reconstruction works on a model prepared as a whole (a traced GraphModule); this one was prepared "
            "per sub-module (prepare(modules=...)). Prepare the whole model, or the sub-module on its own."
        )
    return qmodel


def _check_layers(modules: dict[str, nn.Module], units: list[Unit], method: str) -> None:
    for unit in units:
        for name in unit.layers:
            fq: FakeQuantizer = modules[name].weight_fake_quant
            if fq.scheme.bits > MAX_WEIGHT_BITS:
                raise SchemeError(
                    f"{method} learns the rounding of weights of at most {MAX_WEIGHT_BITS} bits, but {fq.qname} is "
                    f"{fq.scheme.describe()}. At that width nearest rounding is already exact enough: use "
                    "mq.calibrate alone, or prepare with a qconfig of 8 bits or fewer."
                )
            if not uses_fixed_forward(fq):
                raise SchemeError(
                    f"{method} learns weight rounding on a fixed grid, but {fq.qname} is a learnable "
                    f"{type(fq).__name__}. Prepare with the 'fixed' weight quantizer for PTQ, or train the "
                    "learnable one with QAT instead."
                )


def _subgraph(
    gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]
) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` from ``inputs`` through ``nodes``; it shares ``gm``'s sub-modules."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {node: graph.placeholder(node.name) for node in inputs}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = graph.node_copy(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    sub = fx.GraphModule(gm, graph)
    sub.graph.eliminate_dead_code()  # a prefix computes only what the requested values depend on
    sub.recompile()
    return sub


def _prefix(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """The part of ``gm`` that computes the nodes ``names`` from the model's inputs (nothing after them)."""
    all_nodes = [n for n in gm.graph.nodes if n.op != "output"]
    by_name = {n.name: n for n in all_nodes}
    wanted = [by_name[name] for name in names]
    last = max(all_nodes.index(n) for n in wanted)
    return _subgraph(gm, all_nodes[:last + 1], [], wanted)


class _Cache:
    """One unit-boundary value over every calibration sample, filled batch by batch along the batch dimension.

    With the number of samples known (every unit after the first) it is one preallocated tensor; otherwise the
    batches' values are gathered and concatenated once at the end."""

    def __init__(self, name: str, samples: int | None) -> None:
        self.name, self.samples = name, samples
        self.parts: list[torch.Tensor] = []
        self.full: torch.Tensor | None = None
        self.filled = 0

    def add(self, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise ConfigError(f"reconstruction needs tensor values with a batch dimension at unit boundaries; "
                              f"{self.name!r} is not one.")
        value = value.detach()
        if self.samples is None:
            self.parts.append(value)
            return
        if self.full is None:
            self.full = value.new_empty((self.samples, *value.shape[1:]))
        if self.filled + value.shape[0] > self.samples or value.shape[1:] != self.full.shape[1:]:
            raise _changing_data(self.samples)
        self.full[self.filled:self.filled + value.shape[0]] = value
        self.filled += value.shape[0]

    def tensor(self) -> torch.Tensor:
        if self.samples is None:
            return torch.cat(self.parts, 0)
        if self.full is None or self.filled != self.samples:
            raise _changing_data(self.samples)
        return self.full


def _changing_data(samples: int) -> ConfigError:
    return ConfigError(
        f"the calibration data gave {samples} samples on an earlier pass and a different number now; reconstruction "
        "reads the data once per unit and needs the same samples every time. Use a DataLoader with a fixed sampler "
        "(shuffling is fine, a sampler drawing with replacement or a changing num_samples is not)."
    )


def _unit_data(ctx: _Context, unit: Unit) -> _UnitData:
    """One pass over the data: the unit's inputs from the quantized model and its targets (for QDrop also its
    inputs) from the float model, on the same batches."""
    quantized = _prefix(ctx.gm, unit.inputs)
    fp_names = [*unit.outputs, *(unit.inputs if ctx.drop_prob < 1.0 else ())]
    floating = _prefix(ctx.fp, fp_names)
    n_inputs = num_inputs(ctx.gm)
    inputs = [_Cache(name, ctx.samples) for name in unit.inputs]
    fp_values = [_Cache(name, ctx.samples) for name in fp_names]
    with torch.no_grad():
        for batch in ctx.data:
            for cache, value in zip(inputs, run_batch(quantized, batch, n_inputs)):
                cache.add(value)
            for cache, value in zip(fp_values, run_batch(floating, batch, n_inputs)):
                cache.add(value)
    cached = [c.tensor() for c in inputs + fp_values]
    sizes = {t.shape[0] for t in cached}
    if len(sizes) != 1:
        raise ConfigError(f"unit boundary tensors {[c.name for c in inputs + fp_values]} have different batch "
                          f"sizes {sorted(sizes)}.")
    ctx.samples = sizes.pop()
    data = _UnitData(inputs=cached[:len(inputs)], targets=cached[len(inputs):len(inputs) + len(unit.outputs)],
                     fp_inputs=cached[len(inputs) + len(unit.outputs):] if ctx.drop_prob < 1.0 else None)
    log.info("%s %s: cached %d samples, %.1f MiB", ctx.method, unit.name, ctx.samples,
             sum(t.numel() * t.element_size() for t in cached) / 2**20)
    return data


@contextmanager
def _frozen(gm: fx.GraphModule) -> Iterator[None]:
    """Eval mode (BN running statistics, the deploy arithmetic) and no parameter gradients, restored after."""
    training = {m: m.training for m in gm.modules()}
    grads = {p: p.requires_grad for p in gm.parameters()}
    gm.eval()
    for p in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in grads.items():
            p.requires_grad_(flag)


@dataclass
class _UnitData:
    """Cached over all calibration samples: the quantized model's unit inputs, the float model's unit outputs and,
    for QDrop, the float model's unit inputs."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    fp_inputs: list[torch.Tensor] | None


@dataclass
class _Context:
    """What every unit's reconstruction needs: the model, its float copy, the data and the options."""

    gm: fx.GraphModule
    fp: fx.GraphModule
    data: CalibrationData
    config: ReconstructionConfig
    method: str
    drop_prob: float
    generator: torch.Generator
    progress: bool
    #: Calibration samples on this rank, known after the first unit's pass.
    samples: int | None = None


def _error(sub: nn.Module, data: _UnitData, group: dist.ProcessGroup | None) -> float:
    """The unit's reconstruction error over every cached sample (of every rank of ``group``)."""
    inputs, targets = data.inputs, data.targets
    n = inputs[0].shape[0]
    total = torch.zeros(2, dtype=torch.float64, device=inputs[0].device)
    with torch.no_grad():
        for i in range(0, n, _EVAL_CHUNK):
            outs = sub(*[t[i:i + _EVAL_CHUNK] for t in inputs])
            part = [t[i:i + _EVAL_CHUNK] for t in targets]
            total[0] += reconstruction_error(outs, part).double() * min(_EVAL_CHUNK, n - i)
    total[1] = n
    if group is not None:
        total = all_reduce([total], dist.ReduceOp.SUM, group)[0]
    return float(total[0] / total[1])


def _average_gradients(params: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Average the parameters' gradients across the ranks of ``group`` (one collective for all of them)."""
    if group is None:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce([torch.cat([g.flatten() for g in grads])], dist.ReduceOp.SUM, group)[0]
    flat /= dist.get_world_size(group)
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p)


def _activation_patches(ctx: _Context, unit: Unit, modules: dict[str, nn.Module]) -> list[ActivationPatch]:
    """Patches for the unit's enabled activation quantizers; a quantizer of a unit input remembers which one, so
    that QDrop can fall back to the float model's value there."""
    by_name = {n.name: n for n in ctx.gm.graph.nodes}
    input_index = {name: i for i, name in enumerate(unit.inputs)}
    patches = []
    for name in unit.nodes:
        node = by_name[name]
        fq = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(fq, FakeQuantizer) or fq.role == "weight" or not fq.quant_enabled.item():
            continue
        patch = ActivationPatch(fq, ctx.config.learn_activation_scale, ctx.drop_prob, ctx.generator)
        source = node.args[0] if node.args else None
        patch.input_index = input_index.get(source.name) if isinstance(source, fx.Node) else None
        patches.append(patch)
    return patches


def _optimise(ctx: _Context, unit: Unit, sub: nn.Module, data: _UnitData, rounders: list[AdaRoundWeight],
              acts: list[ActivationPatch]) -> None:
    """Adam on the rounding variables (and activation scales, cosine-decayed as in the reference code)."""
    config = ctx.config
    groups: list[dict[str, Any]] = [{"params": [r.alpha for r in rounders], "lr": config.lr}]
    scales = [a.scale for a in acts if a.scale is not None]
    if scales:
        groups.append({"params": scales, "lr": config.activation_lr})
    optimizer = torch.optim.Adam(groups)
    params = [p for group in groups for p in group["params"]]
    n = data.inputs[0].shape[0]
    batch = min(config.batch_size, n)
    for step in tqdm(range(config.iterations), desc=f"{ctx.method} {unit.name}", disable=not ctx.progress,
                     leave=False, unit="it"):
        idx = torch.randperm(n, generator=ctx.generator, device=ctx.generator.device)[:batch]
        idx = idx.to(data.inputs[0].device)
        if data.fp_inputs is not None:
            for act in acts:
                act.fallback = None if act.input_index is None else data.fp_inputs[act.input_index][idx]
        loss = reconstruction_error(sub(*[t[idx] for t in data.inputs]), [t[idx] for t in data.targets])
        beta = beta_at(step, config)
        if beta is not None and config.reg_lambda:
            loss = loss + config.reg_lambda * sum(r.regularizer(beta) for r in rounders)
        if scales:
            groups[1]["lr"] = config.activation_lr * 0.5 * (1.0 + math.cos(math.pi * step / config.iterations))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(params, ctx.data.group)
        optimizer.step()


def _reconstruct_unit(ctx: _Context, unit: Unit) -> None:
    gm = ctx.gm
    modules = dict(gm.named_modules())
    by_name = {n.name: n for n in gm.graph.nodes}
    data = _unit_data(ctx, unit)
    sub = _subgraph(gm, [by_name[n] for n in unit.nodes], [by_name[n] for n in unit.inputs],
                    [by_name[n] for n in unit.outputs])
    before = _error(sub, data, ctx.data.group)
    rounders = {name: AdaRoundWeight(modules[name]) for name in unit.layers}
    acts = _activation_patches(ctx, unit, modules)
    patches: dict[FakeQuantizer, Callable[[torch.Tensor], torch.Tensor]] = {
        modules[name].weight_fake_quant: r.forward for name, r in rounders.items()}
    patches.update({a.fq: a for a in acts})
    with patched(patches):
        _optimise(ctx, unit, sub, data, list(rounders.values()), acts)
    for name, rounder in rounders.items():
        bake(modules[name], rounder.codes())
    for act in acts:
        act.write_back()
    soft = sum(r.soft_fraction() for r in rounders.values()) / max(len(rounders), 1)
    log.info("%s %s (%d layer(s)): reconstruction error %.5g -> %.5g, %.1f%% of the rounding still soft at the end",
             ctx.method, unit.name, len(unit.layers), before, _error(sub, data, ctx.data.group), 100 * soft)


def reconstruct(
    qmodel: nn.Module,
    data: Iterable[Any],
    config: ReconstructionConfig,
    *,
    method: str,
    granularity: Granularity,
    blocks: Sequence[str] = (),
    drop_prob: float = 1.0,
    progress: bool = True,
) -> list[Unit]:
    """Reconstruct every unit of a calibrated prepared model in place; returns the units, in order.

    ``data``: calibration data (a ``CalibrationData``, or anything ``mq.calibrate`` reads that can be read more
    than once). ``drop_prob`` is the probability that an activation element is quantized during optimisation (1.0:
    always, BRECQ/AdaRound; QDrop uses 0.5).
    """
    if not isinstance(data, CalibrationData):
        data = CalibrationData(data)
    gm = _graph_module(qmodel)
    units = discover_units(gm, granularity, blocks)
    _check_layers(dict(gm.named_modules()), units, method)
    fp = copy.deepcopy(gm)
    disable_all(fp)
    fp.eval()
    first = next(gm.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    ctx = _Context(gm, fp, data, config, method, drop_prob, generator, progress)
    log.info("%s: %d unit(s): %s", method, len(units), ", ".join(u.name for u in units))
    with _frozen(gm):
        for unit in units:
            _reconstruct_unit(ctx, unit)
    return units
