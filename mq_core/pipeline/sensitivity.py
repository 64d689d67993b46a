"""``mq.sensitivity``: which quantizers of a calibrated model hurt, and why.

Quantization error has two faces, and a user deciding what to keep in float or at 8 bits needs both:

* **Locally**, per fake quantizer: its tensor quantized against the same tensor in float (``sqnr_db``), computed in
  one run of the model with every quantizer off, so each quantizer sees the float tensor it would quantize; and
  the range statistics that explain a poor SQNR: the observed min/max, the range the qparams represent (the clip
  range), the fraction of values outside it, and a histogram.
* **End to end**, per quantizer (the *sweep*): the model's metric with only this quantizer on (``only_quantized``:
  what it costs alone) and with every quantizer on except this one (``only_float``: what keeping it in float
  buys). The metric is ``eval_fn(model)`` (an accuracy, higher is better) when one is given, else the SQNR of the
  model's outputs against the float model's on the data, in dB.

Cost: the data is read once and held in memory (``max_batches`` bounds it), then run through the model twice with
quantization off (statistics, then histograms over the range the first run found). Without ``eval_fn`` the
quantized model's outputs take one more run and the sweep two runs per quantizer, each over all the batches: for K
quantizers, 2K + 3 runs over the data. With ``eval_fn`` the sweep calls it 2K + 2 times (the float and quantized
baselines, then two per quantizer) instead. ``sweep=False`` leaves only the statistics (two or three runs) and
ranks by the tensor SQNR.

Weight and activation quantizers go through one sweep, each on its own: a layer's weight and output quantizers
are separate rows, because they fail for different reasons (a weight outlier, an activation range) and are
fixed differently. The model's switches (observation, quantization) are restored afterwards, whatever happens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mq_core.errors import CalibrationError, ConfigError
from mq_core.pipeline.calibrate import DEFAULT_BATCH_SIZE, iter_batches, model_inputs
from mq_core.pipeline.prepare import prepare_info
from mq_core.pipeline.runs import flatten_outputs
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.functional import along_axis
from mq_core.quant.switches import quantizers
from mq_core.text import render_table

log = logging.getLogger(__name__)

#: Bins of each quantizer's histogram.
DEFAULT_BINS = 64
#: ``SensitivityReport.metric`` values: output SQNR against float (dB), or the user's ``eval_fn``.
METRIC_SQNR = "sqnr_db"
METRIC_EVAL = "eval"


@dataclass
class QuantizerSensitivity:
    """One fake quantizer: what it quantizes, how much error it adds locally and end to end, and its ranges.

    ``sqnr_db`` is its tensor quantized against the same tensor in float (inf: exact). ``only_quantized`` /
    ``only_float`` are the end-to-end metric with only this quantizer on / all but this one on (None without the
    sweep). ``min``/``max`` are the float tensor's observed range; ``clip_lo``/``clip_hi`` the range its qparams
    represent, ``[(qmin - z) s, (qmax - z) s]`` (per channel: the widest); ``clipped_fraction`` the fraction of
    values outside their own (channel's) range. ``hist_counts`` over ``hist_edges`` (one more edge than counts)
    spans both ranges, so the clip range can be drawn on it. A weight is counted once; an activation over every
    element of every batch.
    """

    name: str
    role: str
    layer: str
    bits: int
    sqnr_db: float
    only_quantized: float | None
    only_float: float | None
    min: float
    max: float
    clip_lo: float
    clip_hi: float
    clipped_fraction: float
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)


@dataclass
class SensitivityReport:
    """What ``mq.sensitivity`` found. ``metric`` says what the end-to-end numbers are (``"sqnr_db"``: the model's
    outputs against float, in dB; ``"eval"``: the user's ``eval_fn``). ``baseline_float`` is the metric of the
    model with every quantizer off (None for SQNR, where float is the reference), ``baseline_quantized`` with all
    on. ``ranking`` names the quantizers most sensitive first."""

    metric: str
    baseline_float: float | None
    baseline_quantized: float
    quantizers: list[QuantizerSensitivity]
    ranking: list[str]

    def by_name(self) -> dict[str, QuantizerSensitivity]:
        return {q.name: q for q in self.quantizers}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable; an exact SQNR is ``inf``): the schema ``report.json`` embeds."""
        return {"metric": self.metric,
                "baseline": {"float": self.baseline_float, "quantized": self.baseline_quantized},
                "quantizers": [dataclasses.asdict(q) for q in self.quantizers],
                "ranking": list(self.ranking)}

    def table(self, limit: int | None = None) -> str:
        """The quantizers most sensitive first (the first ``limit`` of them), under a line with the baselines."""
        found = self.by_name()
        rows = []
        for rank, name in enumerate(self.ranking[:limit], 1):
            q = found[name]
            rows.append([rank, name, q.role, q.layer, q.bits, _db(q.sqnr_db), self._value(q.only_quantized),
                         self._value(q.only_float), f"[{q.min:.4g}, {q.max:.4g}]",
                         f"[{q.clip_lo:.4g}, {q.clip_hi:.4g}]", f"{100 * q.clipped_fraction:.2f}%"])
        if self.metric == METRIC_EVAL:
            header = (f"sensitivity by eval_fn: float {self._value(self.baseline_float)}, quantized "
                      f"{self._value(self.baseline_quantized)}")
        else:
            header = f"sensitivity by output SQNR against float: quantized model {_db(self.baseline_quantized)}"
        shown = "" if limit is None or limit >= len(self.ranking) else f" (the first {limit} of {len(self.ranking)})"
        table = render_table(["#", "quantizer", "role", "layer", "bits", "tensor SQNR", "only this quantized",
                              "all but this quantized", "observed range", "clip range", "clipped"], rows)
        return f"{header}; most sensitive first{shown}\n{table}"

    def _value(self, value: float | None) -> str:
        if value is None:
            return "-"
        return _db(value) if self.metric == METRIC_SQNR else f"{value:.2f}"


def _db(value: float) -> str:
    return "exact" if value == math.inf else f"{value:.1f} dB"


def _ratio_db(signal: float, noise: float) -> float:
    """Signal to noise in dB from sums of squares (inf when there is no noise); ``verify``'s definition, on sums
    accumulated over batches."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


class _TensorStats:
    """One quantizer's float tensor, accumulated over the batches of a run with every quantizer off."""

    def __init__(self, fq: FakeQuantizer, bins: int) -> None:
        self.fq = fq
        self.bins = bins
        scale, zero_point = fq.export_qparams()
        self.clip = fq.scheme.range_of(scale, zero_point)
        self.lo, self.hi = math.inf, -math.inf
        self.signal = self.noise = 0.0
        self.clipped = self.count = 0
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.seen = False  # in this run: a weight is the same tensor in every batch and is counted once

    @property
    def clip_range(self) -> tuple[float, float]:
        return float(self.clip[0].min()), float(self.clip[1].max())

    @property
    def hist_range(self) -> tuple[float, float]:
        clip_lo, clip_hi = self.clip_range
        return min(self.lo, clip_lo), max(self.hi, clip_hi)

    def _wanted(self, x: torch.Tensor) -> bool:
        wanted = x.numel() > 0 and not (self.fq.role == "weight" and self.seen)
        self.seen = True
        return wanted

    def observe(self, x: torch.Tensor) -> None:
        if not self._wanted(x):
            return
        q = self.fq.quantize_forward(x)
        x64 = x.double()
        self.signal += float((x64 * x64).sum())
        self.noise += float(((q.double() - x64) ** 2).sum())
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        lo, hi = (along_axis(t.to(x.device), x, self.fq.ch_axis) for t in self.clip)
        self.clipped += int(((x < lo) | (x > hi)).sum())
        self.count += x.numel()

    def histogram(self, x: torch.Tensor) -> None:
        if self._wanted(x):
            lo, hi = self.hist_range
            self.counts += torch.histc(x.double(), self.bins, lo, hi).cpu()

    def result(self, name: str, layer: str) -> QuantizerSensitivity:
        clip_lo, clip_hi = self.clip_range
        lo, hi = self.hist_range
        return QuantizerSensitivity(
            name=name, role=self.fq.role, layer=layer, bits=self.fq.scheme.bits,
            sqnr_db=_ratio_db(self.signal, self.noise), only_quantized=None, only_float=None,
            min=self.lo, max=self.hi, clip_lo=clip_lo, clip_hi=clip_hi, clipped_fraction=self.clipped / self.count,
            hist_counts=[int(c) for c in self.counts.round().tolist()],
            hist_edges=torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64).tolist())


def _layers(qmodel: nn.Module, names: list[str]) -> dict[str, str]:
    """Per quantizer, the layer it belongs to: a weight's module; for an activation, the module whose output it
    quantizes (so a layer's weight and output quantizers share the name), else the tensor's graph name (an input,
    a functional op)."""
    layers = {}
    for prefix, module in qmodel.named_modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            name = f"{prefix}.{node.target}" if prefix else str(node.target)
            if node.op != "call_module" or name not in names or not node.args:
                continue
            producer = node.args[0]
            if isinstance(producer, torch.fx.Node):
                inner = producer.target if producer.op == "call_module" else producer.name
                layers[name] = f"{prefix}.{inner}" if prefix else str(inner)
    found = quantizers(qmodel)
    return {name: (name.removesuffix(".weight_fake_quant") if found[name].role == "weight"
                   else layers.get(name, found[name].tensor or name)) for name in names}


class _Switches:
    """Sets which of the analysed quantizers quantize, observation off for all; ``restore`` puts every switch back
    as it was. Observation is switched through its buffer: ``enable_observation(False)`` would freeze new qparams
    from whatever the observer holds, and this analysis must not change the model."""

    def __init__(self, qmodel: nn.Module, selected: dict[str, FakeQuantizer]) -> None:
        self.all = quantizers(qmodel)
        self.selected = selected
        self.saved = {name: (fq.observe_enabled.clone(), fq.quant_enabled.clone()) for name, fq in self.all.items()}
        for fq in self.all.values():
            fq.observe_enabled.fill_(0)

    def quantize_only(self, on: set[str]) -> None:
        for name, fq in self.selected.items():
            fq.enable_quantization(name in on)

    def restore(self) -> None:
        for name, fq in self.all.items():
            observe, quant = self.saved[name]
            fq.observe_enabled.copy_(observe)
            fq.quant_enabled.copy_(quant)


def read_batches(qmodel: nn.Module, data: Any, max_batches: int | None, batch_size: int) -> list[Any]:
    """The batches of ``data`` (``mq.calibrate``'s rule), read once: every run must see the same batches, which a
    shuffling loader or a generator would not give again."""
    batches = list(iter_batches(data, max_batches, batch_size))
    if not batches:
        raise CalibrationError("sensitivity() got no batch of data: pass a non-empty tensor [N, ...], Dataset, "
                               "DataLoader or list of batches (a few batches of calibration data are enough).")
    for index, batch in enumerate(batches, 1):
        model_inputs(qmodel, batch, index=index)
    return batches


def run_metric(qmodel: nn.Module, batches: list[Any]) -> Iterator[list[torch.Tensor]]:
    """The model's flattened outputs on each batch (eval mode and no grad are the caller's)."""
    for batch in batches:
        args, kwargs = model_inputs(qmodel, batch)
        yield flatten_outputs(qmodel(*args, **kwargs))


def _float_outputs(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o.detach() for o in outputs if o.is_floating_point()]


class Metric:
    """The end-to-end metric of the model as its switches are now: ``eval_fn(model)``, or the SQNR of its outputs
    against the float outputs ``record_reference`` kept from the float run."""

    def __init__(self, qmodel: nn.Module, batches: list[Any], eval_fn: Callable[[nn.Module], float] | None) -> None:
        self.qmodel, self.batches, self.eval_fn = qmodel, batches, eval_fn
        self.reference: list[list[torch.Tensor]] = []

    @property
    def name(self) -> str:
        return METRIC_SQNR if self.eval_fn is None else METRIC_EVAL

    def record_reference(self, outputs: list[torch.Tensor]) -> None:
        floats = _float_outputs(outputs)
        if not floats:
            raise ConfigError("the model's outputs hold no float tensor, so there is no output SQNR to measure; pass "
                              "eval_fn (a score of the model, higher is better; --eval on the command line).")
        self.reference.append(floats)

    def __call__(self) -> float:
        if self.eval_fn is not None:
            value = self.eval_fn(self.qmodel)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"eval_fn returned {value!r:.80} ({type(value).__name__}); it must return the "
                                  "model's accuracy (or any score, higher is better) as a finite number.")
            return float(value)
        signal = noise = 0.0
        for reference, outputs in zip(self.reference, run_metric(self.qmodel, self.batches)):
            for ref, out in zip(reference, _float_outputs(outputs)):
                ref64 = ref.double()
                signal += float((ref64 * ref64).sum())
                noise += float(((out.double() - ref64) ** 2).sum())
        return _ratio_db(signal, noise)


def _check_options(eval_fn: Any, sweep: Any, bins: Any) -> None:
    if eval_fn is not None and not callable(eval_fn):
        raise ConfigError(f"eval_fn must be a function taking the model and returning a score, got "
                          f"{type(eval_fn).__name__}.")
    if not isinstance(sweep, bool):
        raise ConfigError(f"sweep must be True or False, got {sweep!r}.")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins!r}.")


def sensitivity(
    qmodel: nn.Module,
    data: Any,
    *,
    eval_fn: Callable[[nn.Module], float] | None = None,
    sweep: bool = True,
    max_batches: int | None = None,
    bins: int = DEFAULT_BINS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> SensitivityReport:
    """Per fake quantizer of a prepared, calibrated model: its local error, range statistics and (``sweep``)
    end-to-end effect, most sensitive first (module docstring; the cost is there too).

    Args:
        qmodel: a prepared model after ``mq.calibrate`` (or a restored checkpoint). The quantizers analysed are
            those whose quantization is on; one switched off stays off and is not listed.
        data: batches to run, as ``mq.calibrate`` takes them (a tensor ``[N, ...]``, a Dataset, a DataLoader, a
            list of batches); read once and held in memory.
        eval_fn: ``eval_fn(model) -> float``, higher is better (an accuracy), called on ``qmodel`` with switches
            set for each measurement. Without it, the metric is the output SQNR against float on ``data``.
        sweep: measure every quantizer end to end (two runs or ``eval_fn`` calls per quantizer). Without it the
            ranking is by the tensor SQNR alone.
        max_batches: read at most this many batches of ``data``.
        bins: histogram bins per quantizer.
        batch_size: samples per batch when ``data`` is a tensor or a Dataset.
        progress: a tqdm bar over the sweep.

    Ranking with the sweep: the lowest ``only_quantized`` first (the largest drop from float when only this
    quantizer is on), ties broken by the highest ``only_float`` (the largest gain when only it is left in float),
    then by the lowest tensor SQNR (an accuracy often ties).
    The model's switches are as before when it returns or raises.
    """
    prepare_info(qmodel)
    _check_options(eval_fn, sweep, bins)
    selected = {name: fq for name, fq in quantizers(qmodel).items() if fq.quant_enabled.item()}
    if not selected:
        raise CalibrationError("sensitivity() found no quantizer with quantization on: run mq.calibrate(qmodel, "
                               "data) first (or pass a restored, calibrated checkpoint).")
    batches = read_batches(qmodel, data, max_batches, batch_size)
    stats = {name: _TensorStats(fq, bins) for name, fq in selected.items()}
    switches = _Switches(qmodel, selected)
    metric = Metric(qmodel, batches, eval_fn)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            switches.quantize_only(set())
            _statistics_runs(metric, stats)
            baseline_float = metric() if eval_fn is not None else None
            switches.quantize_only(set(selected))
            baseline_quantized = metric()
            rows = [s.result(name, layer) for (name, s), layer in
                    zip(stats.items(), _layers(qmodel, list(selected)).values())]
            if sweep:
                _sweep(rows, switches, metric, progress)
    finally:
        switches.restore()
        qmodel.train(was_training)
    if sweep:
        order = sorted(rows, key=lambda r: (r.only_quantized, -r.only_float, r.sqnr_db))  # type: ignore[operator]
    else:
        order = sorted(rows, key=lambda r: r.sqnr_db)
    report = SensitivityReport(metric.name, baseline_float, baseline_quantized, rows, [r.name for r in order])
    log.info("sensitivity: %d quantizers, most sensitive %s", len(rows), report.ranking[0])
    return report


def _statistics_runs(metric: Metric, stats: dict[str, _TensorStats]) -> None:
    """Two runs with every quantizer off: min/max, SQNR and clipping (and the float outputs the SQNR metric
    compares with), then the histograms over the range the first run found."""
    _hooked_run(metric, stats, _TensorStats.observe, record=metric.eval_fn is None)
    unreached = [name for name, s in stats.items() if s.count == 0]
    if unreached:
        raise CalibrationError(f"the data never reaches {len(unreached)} quantizer(s): {', '.join(unreached[:10])}. "
                               "Pass data that takes every branch of the model (e.g. the calibration data).")
    _hooked_run(metric, stats, _TensorStats.histogram, record=False)


def _hooked_run(metric: Metric, stats: dict[str, _TensorStats],
                collect: Callable[[_TensorStats, torch.Tensor], None], record: bool) -> None:
    """One run over the batches, each quantizer's input given to ``collect(its stats, input)`` (and the outputs to
    ``metric.record_reference`` when ``record``)."""
    handles = []
    for s in stats.values():
        s.seen = False
        handles.append(s.fq.register_forward_hook(lambda m, args, out, s=s: collect(s, args[0].detach())))
    try:
        for outputs in run_metric(metric.qmodel, metric.batches):
            if record:
                metric.record_reference(outputs)
    finally:
        for handle in handles:
            handle.remove()


def _sweep(rows: list[QuantizerSensitivity], switches: _Switches, metric: Metric, progress: bool) -> None:
    """Two measurements per quantizer: only it on, then all but it on."""
    every = {r.name for r in rows}
    with tqdm(total=2 * len(rows), desc="sensitivity", unit="run", disable=not progress, leave=False) as bar:
        for row in rows:
            switches.quantize_only({row.name})
            row.only_quantized = metric()
            bar.update()
            switches.quantize_only(every - {row.name})
            row.only_float = metric()
            bar.update()
