"""``mq.search_mixed_precision``: per-layer bit widths (or float) that keep a model within an accuracy budget.

The budget ``B`` is measured on the user's ``eval_fn`` (points of its percent below the float model) or, without
one, on the output SQNR (dB below the model with every layer at 8 bits, on the calibration data). A *layer* is what
a per-layer qconfig names (``mq_core.graph.layer_qconfig``): a module with a weight, or an op whose output is
quantized (``relu_1``); its quantizers are those that follow its qconfig (``FakeQuantizer.layer``).

Candidates per layer: the qconfig the user starts from (``w2a4``), the core's presets between it and 8 bits that
the backend can run (``w4a4``, ``w4a8``), ``w8a8``, and float (a layer left unquantized; every backend exports
float layers as float ops). A layer without a weight only has its activation width to choose, so its candidates
are the distinct activation widths.

Search (greedy, as in HAWQ-style bit allocation without the Hessian):

1. every layer at the starting qconfig; if that is within the budget, done;
2. sensitivity: the metric with one layer raised to 8 bits, each layer alone;
3. raise the layers to 8 bits, most sensitive first, until within the budget;
4. if every layer at 8 bits is not within it, leave layers in float, most sensitive first, until it is;
5. pruning: each changed layer, least sensitive first, is lowered to the lowest candidate that keeps the model
   within the budget.

Cost. Each candidate qconfig is prepared and calibrated once (``mq.calibrate``, on all the calibration data):
calibration observes float tensors (quantization is off while observers run), so a quantizer's qparams depend only
on its tensor and its own qconfig, and any assignment is assembled exactly from the calibrated candidates by
swapping quantizer modules, with no further calibration. Then for U layers and K candidates: one metric
measurement for the reference and one for the start, U for the sensitivity, at most U for step 3, U for step 4
and U*K for step 5; each is one ``eval_fn`` call or one run over the held batches (``sqnr_batches``). On the
digits residual net (9 layers, 4 candidates) this is 4 calibrations and about 30 evaluations,
6 s of CPU time on one core.

Float layers are emulated by switching their quantizers off; ``prepare`` then skips them, which under input
placement (TensorRT) can also drop a quantizer a float consumer would have read, so the chosen model's own metric
(measured again by ``mq quantize``) can differ slightly from the search's when a layer is left in float.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mq_core.backend import Backend
from mq_core.errors import ConfigError, MQError
from mq_core.pipeline.calibrate import DEFAULT_BATCH_SIZE, calibrate
from mq_core.pipeline.prepare import prepare
from mq_core.pipeline.resolve import FLOAT, QConfigLike, resolve_backend, resolve_qconfig, with_observer
from mq_core.pipeline.sensitivity import METRIC_EVAL, METRIC_SQNR, Metric, read_batches, run_metric
from mq_core.quant.qconfig import QConfig
from mq_core.quant.switches import disable_all, quantizers

log = logging.getLogger(__name__)

#: The 8-bit candidate every layer can be raised to.
HIGH = "w8a8"
#: The core's presets between a low-bit start and 8 bits, in increasing precision.
LADDER = ("w2a4", "w4a4", "w4a8", HIGH)
#: Batches of calibration data the SQNR metric runs on (without ``eval_fn``).
DEFAULT_SQNR_BATCHES = 4
#: Bits a float weight takes in ``size_bytes``.
FLOAT_BITS = 32


@dataclass
class MixedPrecisionResult:
    """The chosen per-layer assignment and how it was found; ``to_dict`` is what ``report.json`` holds.

    ``reference`` is what the budget is measured from (the float model's ``eval_fn`` score, or the all-8-bit
    model's output SQNR in dB); ``score`` is the chosen assignment's. ``qconfig`` is the per-layer qconfig that
    prepares the chosen model: ``mq.prepare(model, backend, x, qconfig=result.qconfig)``.
    """

    budget: float
    metric: str
    reference: float
    assignment: dict[str, str]
    score: float
    size_bytes: int
    size_all8_bytes: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    start: str = ""
    #: the qconfig behind each candidate name (the start may be a QConfig, with an observer replaced)
    candidates: dict[str, QConfig] = field(default_factory=dict, repr=False)

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.assignment.values():
            counts[name] = counts.get(name, 0) + 1
        return counts

    @property
    def within_budget(self) -> bool:
        return self.score >= self.reference - self.budget

    @property
    def qconfig(self) -> dict[str, QConfigLike]:
        """Per-layer qconfigs for ``mq.prepare``: the start for ``"*"``, each changed layer by name."""
        chosen: dict[str, QConfigLike] = {"*": self.candidates.get(self.start, self.start)}
        for layer, name in self.assignment.items():
            if name != self.start:
                chosen[layer] = FLOAT if name == FLOAT else self.candidates.get(name, name)
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {"budget": float(self.budget), "metric": self.metric, "reference": float(self.reference),
                "assignment": dict(self.assignment), "score": float(self.score), "size_bytes": int(self.size_bytes),
                "size_all8_bytes": int(self.size_all8_bytes), "counts": self.counts,
                "steps": [dict(s) for s in self.steps]}

    def lines(self) -> list[str]:
        """The chosen assignment, the metric and the size, as ``mq quantize`` prints them."""
        unit = "dB output SQNR" if self.metric == METRIC_SQNR else "points"
        what = "all-8-bit SQNR" if self.metric == METRIC_SQNR else "float"
        verdict = "within" if self.within_budget else "NOT within"
        lines = [f"mixed precision: {_number(self.score, self.metric)} vs {what} {_number(self.reference, self.metric)}"
                 f", {verdict} the budget of {self.budget:g} {unit}; weights {self.size_bytes} bytes "
                 f"({100 * self.size_bytes / max(self.size_all8_bytes, 1):.0f}% of all-8-bit)",
                 "  " + ", ".join(f"{n} x{c}" for n, c in sorted(self.counts.items()))]
        by_config: dict[str, list[str]] = {}
        for layer, name in self.assignment.items():
            by_config.setdefault(name, []).append(layer)
        lines += [f"  {name}: {', '.join(layers)}" for name, layers in by_config.items() if name != self.start]
        return lines


def _number(value: float, metric: str) -> str:
    return f"{value:.2f} dB" if metric == METRIC_SQNR else f"{value:.2f}%"


def _bits(qconfig: QConfig) -> tuple[int, int]:
    return qconfig.weight.scheme.bits, qconfig.activation.scheme.bits


def _ladder(target: Backend, start: QConfig, start_name: str, observer: str | None,
            candidates: Sequence[str] | None) -> dict[str, QConfig]:
    """Candidate names -> qconfigs, in increasing precision: the start, then the presets above it that the target
    runs (of ``LADDER`` by default: one the target cannot run, or not installed, is left out; a ``candidates`` name
    that cannot be used is an error)."""
    low = _bits(start)
    ladder: dict[str, QConfig] = {start_name: start}
    for name in LADDER if candidates is None else candidates:
        try:
            resolved = resolve_qconfig(target, with_observer(target, name, observer))
        except MQError as exc:
            if candidates is not None:
                raise
            log.debug("mixed precision: %s is no candidate (%s)", name, exc)
            continue
        w, a = _bits(resolved)
        if w >= low[0] and a >= low[1] and (w, a) != low:
            ladder.setdefault(name, resolved)
    return dict(sorted(ladder.items(), key=lambda item: _bits(item[1])))


@dataclass
class _Layer:
    name: str
    quantizers: list[str]
    weight_numel: int
    choices: list[str]  # candidate names, increasing precision (float last)

    @property
    def top(self) -> str:
        """The most precise quantized candidate (8 bits where the target runs it)."""
        return [c for c in self.choices if c != FLOAT][-1]


def _layers(start_model: nn.Module, ladder: dict[str, QConfig], start: str) -> list[_Layer]:
    """The model's layers (as per-layer qconfigs name them), their quantizers and their candidates."""
    grouped: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for name, fq in quantizers(start_model).items():
        layer = fq.layer or name
        grouped.setdefault(layer, []).append(name)
        if fq.role == "weight":
            owner = start_model.get_submodule(name.removesuffix(".weight_fake_quant"))
            numel[layer] = numel.get(layer, 0) + int(owner.weight.numel())
    layers = []
    for layer, names in grouped.items():
        has_weight = layer in numel
        choices: list[str] = []
        for candidate, qconfig in ladder.items():
            w, a = _bits(qconfig)
            key = (w, a) if has_weight else a
            previous = None if not choices else _bits(ladder[choices[-1]])
            if previous is not None and (previous if has_weight else previous[1]) == key:
                if choices[-1] != start:
                    choices[-1] = candidate  # same widths for this layer: keep the higher name
                continue
            choices.append(candidate)
        layers.append(_Layer(layer, names, numel.get(layer, 0), choices))
    return layers


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class _Assembler:
    """A working model whose quantizers are taken, layer by layer, from the calibrated candidate models."""

    def __init__(self, models: dict[str, nn.Module], layers: list[_Layer], start: str) -> None:
        self.models, self.layers = models, {layer.name: layer for layer in layers}
        self.work = copy.deepcopy(models[start])

    def apply(self, assignment: Mapping[str, str]) -> nn.Module:
        for layer, choice in assignment.items():
            for name in self.layers[layer].quantizers:
                _set_submodule(self.work, name, self.models[choice].get_submodule(name))
        return self.work


def _size(layers: list[_Layer], ladder: dict[str, QConfig], assignment: Mapping[str, str]) -> int:
    """Weight storage in bytes: each layer's weights at its qconfig's width (a float weight takes 4 bytes)."""
    bits = sum(layer.weight_numel * (FLOAT_BITS if assignment[layer.name] == FLOAT
                                     else _bits(ladder[assignment[layer.name]])[0])
               for layer in layers)
    return math.ceil(bits / 8)


def search_mixed_precision(
    model: nn.Module,
    backend: Backend | str,
    example_inputs: Any,
    calib_data: Any = None,
    *,
    accuracy_budget: float,
    eval_fn: Callable[[nn.Module], float] | None = None,
    qconfig: QConfigLike = None,
    observer: str | None = None,
    forward_loop: Callable[[nn.Module], Any] | None = None,
    candidates: Sequence[str] | None = None,
    allow_float: bool = True,
    sqnr_batches: int = DEFAULT_SQNR_BATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **prepare_options: Any,
) -> MixedPrecisionResult:
    """Search per-layer qconfigs (bit widths, or float) that keep ``model`` within ``accuracy_budget`` of the
    reference, starting from ``qconfig`` everywhere and raising the fewest layers (module docstring: the search and
    its cost). ``mq quantize --accuracy-budget B`` runs it and then quantizes with ``result.qconfig``.

    Args:
        model: the float model (not modified).
        backend: the target; only bit widths it can run are candidates.
        example_inputs: as ``mq.prepare`` takes them.
        calib_data: calibration data as ``mq.calibrate`` reads it (or ``forward_loop``); its first
            ``sqnr_batches`` batches are the SQNR metric's data.
        accuracy_budget: points of ``eval_fn`` (percent) below the float model, or without ``eval_fn`` dB of output
            SQNR below the all-8-bit model.
        eval_fn: ``eval_fn(model) -> float``, an accuracy in percent (higher is better).
        qconfig: the starting, lowest qconfig (``"w2a4"``); default the backend's.
        observer: the activation observer of every candidate (``--observer``).
        candidates: preset names to consider between the start and 8 bits (default ``LADDER``).
        allow_float: whether a layer may be left in float when 8 bits is not enough.
        prepare_options: passed to ``mq.prepare`` (``skip``, ``leaf_modules``, ...).
    """
    if not isinstance(accuracy_budget, int | float) or isinstance(accuracy_budget, bool) or not (
            math.isfinite(accuracy_budget) and accuracy_budget >= 0):
        raise ConfigError(f"accuracy_budget must be a finite number >= 0 (points of the eval metric, or dB of SQNR), "
                          f"got {accuracy_budget!r}.")
    if (calib_data is None) == (forward_loop is None):
        raise ConfigError("search_mixed_precision() needs calibration data or a forward_loop, exactly one of them.")
    if eval_fn is not None and not callable(eval_fn):
        raise ConfigError(f"eval_fn must be a function taking the model and returning its accuracy, got "
                          f"{type(eval_fn).__name__}.")
    if isinstance(qconfig, Mapping):
        raise ConfigError("the mixed-precision search starts from one qconfig for every layer (e.g. 'w2a4') and "
                          "chooses the per-layer qconfigs itself; pass a single qconfig, not a dict.")
    target = resolve_backend(backend)
    start_qconfig = resolve_qconfig(target, with_observer(target, qconfig, observer))
    start = qconfig if isinstance(qconfig, str) else start_qconfig.name
    ladder = _ladder(target, start_qconfig, start, observer, candidates)

    def calibrated(choice: QConfig) -> nn.Module:
        qmodel = prepare(model, target, example_inputs, qconfig=choice, **prepare_options)
        if forward_loop is not None:
            return calibrate(qmodel, forward_loop=forward_loop, progress=False)
        return calibrate(qmodel, calib_data, progress=False, batch_size=batch_size)

    models = {name: calibrated(choice).eval() for name, choice in ladder.items()}
    models[FLOAT] = copy.deepcopy(models[start])
    disable_all(models[FLOAT])
    layers = _layers(models[start], ladder, start)
    if allow_float:
        for layer in layers:
            layer.choices.append(FLOAT)
    assembler = _Assembler(models, layers, start)
    batches = ([example_inputs] if calib_data is None
               else read_batches(models[start], calib_data, sqnr_batches, batch_size))
    metric = Metric(assembler.work, batches, eval_fn)
    with torch.no_grad():
        if eval_fn is None:
            for outputs in run_metric(models[FLOAT], batches):
                metric.record_reference(outputs)

        def score(assignment: Mapping[str, str]) -> float:
            assembler.apply(assignment)
            return metric()

        all8 = {layer.name: layer.top for layer in layers}
        reference = float(eval_fn(model)) if eval_fn is not None else score(all8)
        floor = reference - accuracy_budget
        assignment = {layer.name: start for layer in layers}
        current = score(assignment)
        steps: list[dict[str, Any]] = []

        def move(layer: str, to: str, value: float | None = None) -> float:
            """Set ``layer`` to ``to`` (its score already measured, or measured now) and record the step."""
            if value is None:
                value = score({**assignment, layer: to})
            steps.append({"layer": layer, "from": assignment[layer], "to": to, "score": value})
            assignment[layer] = to
            return value

        if current < floor:
            gain = {layer.name: score({**assignment, layer.name: all8[layer.name]}) - current for layer in layers}
            order = sorted(layers, key=lambda layer: -gain[layer.name])  # most sensitive first
            log.info("mixed precision: %s everywhere scores %.4g (reference %.4g); gain of 8 bits per layer: %s",
                     start, current, reference, ", ".join(f"{k} {v:+.3g}" for k, v in gain.items()))
            for to in (all8, FLOAT):  # raise to 8 bits; then, if that is not enough, leave layers in float
                for layer in order:
                    if current >= floor or (to == FLOAT and not allow_float):
                        break
                    wanted = to if isinstance(to, str) else to[layer.name]
                    if assignment[layer.name] != wanted:
                        current = move(layer.name, wanted)
            if current >= floor:  # pruning: lower what is no longer needed, least sensitive first
                for layer in reversed(order):
                    now = assignment[layer.name]
                    for lower in layer.choices[:layer.choices.index(now)] if now != start else []:
                        value = score({**assignment, layer.name: lower})
                        if value >= floor:
                            current = move(layer.name, lower, value)
                            break
            else:
                log.warning("mixed precision: no assignment reaches %.4g (the best found scores %.4g); the most "
                            "precise one is used", floor, current)
    result = MixedPrecisionResult(
        budget=float(accuracy_budget), metric=METRIC_EVAL if eval_fn is not None else METRIC_SQNR,
        reference=reference, assignment=dict(assignment), score=current,
        size_bytes=_size(layers, ladder, assignment), size_all8_bytes=sum(layer.weight_numel for layer in layers),
        steps=steps, start=start, candidates=dict(ladder))
    log.info("%s", "; ".join(line.strip() for line in result.lines()))
    return result
