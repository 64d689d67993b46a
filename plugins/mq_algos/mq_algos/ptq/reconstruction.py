"""The reconstruction engine shared by AdaRound, BRECQ and QDrop.

For each unit (``mq_algos.ptq.blocks``), in graph order:

1. cache the unit's inputs from the *quantized* model, with every earlier unit already reconstructed (BRECQ's
   asymmetric reconstruction), and the unit's outputs from the *float* model (a copy of the prepared model with
   all quantizers off, taken before any weight changes) as targets;
2. learn AdaRound rounding variables for the unit's weight layers (and, optionally, LSQ step sizes of the
   activation quantizers inside it, their learning rate cosine-decayed to 0 as in the reference code) with Adam,
   minimising ``rec + lambda * sum(1 - |2h - 1|^beta)``. QDrop leaves each activation element unquantized with
   probability 1 - p; at the unit's inputs the unquantized value is the float model's (as in the QDrop reference
   code, which mixes the quantized and the float block inputs), inside the unit the quantized model's own;
3. bake the hard rounding into the layer weights and write the learned activation scales back.

Memory: the inputs and targets of one unit for *all* calibration samples are held at once (float32, on the
model's device), plus a float copy of the model. For a 64x56x56 activation that is ~0.8 MB per sample, so keep the
calibration set to a few hundred or a thousand samples for ImageNet-sized models.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from mq_algos.ptq.activations import ActivationPatch, patched, uses_fixed_forward
from mq_algos.ptq.blocks import Granularity, Unit, discover_units
from mq_algos.ptq.rounding import AdaRoundWeight, bake
from mq_core.plugin_api import ConfigError, FakeQuantizer, SchemeError, disable_all, num_inputs, run_batch

log = logging.getLogger(__name__)

#: Widest weight grid whose rounding is learned: above 8 bits a rounding step is below the float noise of the
#: reconstruction loss, and ONNX export stops at 8 bits anyway.
MAX_WEIGHT_BITS = 8
#: Samples per forward pass when measuring a unit's error before and after reconstruction.
_EVAL_CHUNK = 256


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


def _cache(gm: fx.GraphModule, names: Sequence[str], batches: list[Any]) -> list[torch.Tensor]:
    """The values of the nodes ``names`` over all calibration batches, concatenated along the batch dim."""
    all_nodes = [n for n in gm.graph.nodes if n.op != "output"]
    by_name = {n.name: n for n in all_nodes}
    wanted = [by_name[name] for name in names]
    last = max(all_nodes.index(n) for n in wanted)
    prefix = _subgraph(gm, all_nodes[:last + 1], [], wanted)
    n_inputs = num_inputs(gm)
    per_batch: list[tuple[Any, ...]] = []
    with torch.no_grad():
        for batch in batches:
            per_batch.append(run_batch(prefix, batch, n_inputs))
    cached = []
    for i, name in enumerate(names):
        values = [out[i] for out in per_batch]
        if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
            raise ConfigError(
                f"reconstruction needs tensor values with a batch dimension at unit boundaries; {name!r} is not one."
            )
        cached.append(torch.cat(values, 0))
    sizes = {t.shape[0] for t in cached}
    if len(sizes) != 1:
        raise ConfigError(f"unit boundary tensors {list(names)} have different batch sizes {sorted(sizes)}.")
    return cached


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
    batches: list[Any]
    config: ReconstructionConfig
    method: str
    drop_prob: float
    generator: torch.Generator
    progress: bool


def _error(sub: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    total, n = 0.0, inputs[0].shape[0]
    with torch.no_grad():
        for i in range(0, n, _EVAL_CHUNK):
            outs = sub(*[t[i:i + _EVAL_CHUNK] for t in inputs])
            part = [t[i:i + _EVAL_CHUNK] for t in targets]
            total += float(reconstruction_error(outs, part)) * min(_EVAL_CHUNK, n - i)
    return total / n


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
        optimizer.step()


def _reconstruct_unit(ctx: _Context, unit: Unit) -> None:
    gm = ctx.gm
    modules = dict(gm.named_modules())
    by_name = {n.name: n for n in gm.graph.nodes}
    data = _UnitData(
        inputs=_cache(gm, unit.inputs, ctx.batches),
        targets=_cache(ctx.fp, unit.outputs, ctx.batches),
        fp_inputs=_cache(ctx.fp, unit.inputs, ctx.batches) if ctx.drop_prob < 1.0 else None,
    )
    sub = _subgraph(gm, [by_name[n] for n in unit.nodes], [by_name[n] for n in unit.inputs],
                    [by_name[n] for n in unit.outputs])
    before = _error(sub, data.inputs, data.targets)
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
             ctx.method, unit.name, len(unit.layers), before, _error(sub, data.inputs, data.targets), 100 * soft)


def reconstruct(
    qmodel: nn.Module,
    batches: list[Any],
    config: ReconstructionConfig,
    *,
    method: str,
    granularity: Granularity,
    blocks: Sequence[str] = (),
    drop_prob: float = 1.0,
    progress: bool = True,
) -> list[Unit]:
    """Reconstruct every unit of a calibrated prepared model in place; returns the units, in order.

    ``drop_prob`` is the probability that an activation element is quantized during optimisation (1.0: always,
    BRECQ/AdaRound; QDrop uses 0.5).
    """
    gm = _graph_module(qmodel)
    units = discover_units(gm, granularity, blocks)
    _check_layers(dict(gm.named_modules()), units, method)
    fp = copy.deepcopy(gm)
    disable_all(fp)
    fp.eval()
    first = next(gm.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    ctx = _Context(gm, fp, batches, config, method, drop_prob, generator, progress)
    log.info("%s: %d unit(s): %s", method, len(units), ", ".join(u.name for u in units))
    with _frozen(gm):
        for unit in units:
            _reconstruct_unit(ctx, unit)
    return units
