"""The report's figures, drawn with matplotlib and inlined in the page as SVG.

Each public function takes a part of report.json (``mq_core.report.data``) and returns one ``<svg>`` element as
text, or None when the part has nothing to plot. matplotlib is optional (the ``report`` extra): ``available()``
says whether it imports; without it the report is written without figures. Figures are drawn on
``matplotlib.figure.Figure`` objects, never through pyplot, so no GUI backend is chosen and no global figure state
is touched. The SVG keeps its text as text (``svg.fonttype = "none"``: no glyph outlines, no font files) and loses
its metadata block and DOCTYPE, so the page refers to nothing outside itself; each figure gets its own id salt, so
the ids of several figures in one page never collide.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec

from mq_core.report.data import as_number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: At most this many range histograms (the most sensitive quantizers first); report.json holds all.
MAX_HISTOGRAMS = 12
#: At most this many quantizers in the ranking chart.
MAX_RANKED = 20
_WIDTH = 9.0
_HEADER = re.compile(r"\A.*?(?=<svg\b)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
P = ParamSpec("P")


def available() -> bool:
    """Whether matplotlib imports (``pip install "mq-core[report]"``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _drawn(salt: str) -> Callable[[Callable[P, Figure | None]], Callable[P, str | None]]:
    """Turn a function that draws a Figure (or None: nothing to plot) into one that returns its SVG. It draws under
    the report's settings: text stays text, ids are salted per figure, and names are never read as TeX (a ``$``
    in a layer name is a character, not the start of a formula)."""
    def decorate(draw: Callable[P, Figure | None]) -> Callable[P, str | None]:
        @functools.wraps(draw)
        def svg(*args: P.args, **kwargs: P.kwargs) -> str | None:
            import matplotlib

            with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9,
                                        "text.parse_math": False, "text.usetex": False}):
                fig = draw(*args, **kwargs)
                if fig is None:
                    return None
                buffer = io.StringIO()
                fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
            return _METADATA.sub("", _HEADER.sub("", buffer.getvalue()))

        return svg

    return decorate


def _figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(_WIDTH, height), layout="constrained")


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _label(q: dict[str, Any]) -> str:
    return _short(f"{q.get('layer') or q['name']} ({q['role'][0]})")


@_drawn("sqnr")
def sqnr_bars(sensitivity: dict[str, Any]) -> Figure | None:
    """Per quantizer, in model order, the SQNR of its tensor quantized against the same tensor in float: a short
    bar is a tensor that quantization hurts."""
    rows = [(q, as_number(q.get("sqnr_db"))) for q in sensitivity.get("quantizers", [])]
    rows = [(q, v) for q, v in rows if v is not None and not math.isnan(v)]
    if not rows:
        return None
    finite = [v for _, v in rows if math.isfinite(v)]
    cap = max(finite, default=60.0) * 1.1 or 1.0  # an exact tensor (inf dB) is drawn at the longest finite bar
    fig = _figure(1.2 + 0.22 * len(rows))
    ax = fig.add_subplot()
    values = [v if math.isfinite(v) else cap for _, v in rows]
    colors = ["#4c72b0" if q["role"] == "weight" else "#dd8452" for q, _ in rows]
    positions = range(len(rows))
    ax.barh(positions, values, color=colors)
    ax.set_yticks(list(positions), [_label(q) for q, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of the quantized tensor vs float (dB; higher is better)")
    ax.set_title("Per-layer SQNR (blue: weights, orange: activations)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _histogram(ax: Axes, q: dict[str, Any]) -> None:
    counts = [int(c) for c in q.get("hist_counts") or []]
    edges = [as_number(e) for e in q.get("hist_edges") or []]
    if counts and len(edges) == len(counts) + 1 and all(e is not None and math.isfinite(e) for e in edges):
        widths = [b - a for a, b in itertools.pairwise(edges)]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="#8da0cb", linewidth=0)
        ax.set_yscale("symlog", linthresh=1)
    for key, style in (("clip_lo", "--"), ("clip_hi", "--")):
        value = as_number(q.get(key))
        if value is not None and math.isfinite(value):
            ax.axvline(value, color="#c44e52", linestyle=style, linewidth=1.2)
    clipped = as_number(q.get("clipped_fraction"))
    suffix = "" if clipped is None else f", {100 * clipped:.2g}% clipped"
    ax.set_title(_short(f"{q.get('layer') or q['name']} ({q['role']}{suffix})", 44), fontsize=8)
    ax.tick_params(labelsize=7)


@_drawn("ranges")
def range_histograms(sensitivity: dict[str, Any]) -> Figure | None:
    """Histograms of the float tensors of the most sensitive quantizers (ranking order), with the clipping range
    the qparams represent marked by red dashed lines: mass outside them is clipped, a range much wider than the
    mass wastes levels."""
    by_name = {q["name"]: q for q in sensitivity.get("quantizers", [])}
    order = [by_name[n] for n in sensitivity.get("ranking", []) if n in by_name]
    order += [q for q in by_name.values() if q not in order]
    shown = [q for q in order if q.get("hist_counts")][:MAX_HISTOGRAMS]
    if not shown:
        return None
    columns = 3
    rows = math.ceil(len(shown) / columns)
    fig = _figure(0.6 + 2.0 * rows)
    for i, q in enumerate(shown):
        _histogram(fig.add_subplot(rows, columns, i + 1), q)
    fig.suptitle("Float ranges (log counts) with the clipping range (red dashed), most sensitive first")
    return fig


@_drawn("ranking")
def ranking_bars(sensitivity: dict[str, Any]) -> Figure | None:
    """The most sensitive quantizers, most sensitive first: the end-to-end metric with only that quantizer on, and
    with every quantizer on but that one, against the float and fully quantized baselines."""
    by_name = {q["name"]: q for q in sensitivity.get("quantizers", [])}
    ranked = [by_name[n] for n in sensitivity.get("ranking", []) if n in by_name][:MAX_RANKED]
    pairs = [(as_number(q.get("only_quantized")), as_number(q.get("only_float"))) for q in ranked]
    if not ranked or all(a is None and b is None for a, b in pairs):
        return None
    fig = _figure(1.4 + 0.3 * len(ranked))
    ax = fig.add_subplot()
    height = 0.4
    finite = [v for pair in pairs for v in pair if v is not None and math.isfinite(v)]
    cap = max(finite, default=1.0)
    for offset, index, label, color in ((-height / 2, 0, "only this quantizer on", "#dd8452"),
                                        (height / 2, 1, "all on but this one", "#55a868")):
        values = [pair[index] for pair in pairs]
        ax.barh([i + offset for i in range(len(ranked))],
                [0.0 if v is None or math.isnan(v) else min(v, cap) for v in values], height=height, color=color,
                label=label)
    baseline = sensitivity.get("baseline") or {}
    for key, label, style in (("float", "float model", ":"), ("quantized", "fully quantized", "--")):
        value = as_number(baseline.get(key))
        if value is not None and math.isfinite(value):
            ax.axvline(value, color="#333333", linestyle=style, linewidth=1, label=label)
    ax.set_yticks(range(len(ranked)), [_label(q) for q in ranked])
    ax.invert_yaxis()
    metric = sensitivity.get("metric", "")
    ax.set_xlabel("output SQNR vs float (dB)" if metric == "sqnr_db" else "evaluation metric")
    ax.set_title("Sensitivity ranking: end-to-end effect of each quantizer")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


@_drawn("verification")
def verification_lines(layers: Sequence[dict[str, Any]]) -> Figure | None:
    """Per export, artifact and runtime, the fraction of each quantized tensor's codes equal to the simulation's,
    in graph order: through the whole network (drift, which may grow with depth on a correct export) and locally
    (the op fed the simulation's codes; a drop there is an error in the artifact)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for layer in layers:
        for check in layer.get("checks", []):
            runs.setdefault(f"{layer['exporter']}: {check['artifact']} in {check['runtime']}", []).append(check)
    if not runs:
        return None
    fig = _figure(3.6)
    through, local = fig.subplots(1, 2, sharey=True)
    for name, checks in runs.items():
        positions = [c["position"] for c in checks]
        line = through.plot(positions, [100 * (as_number(c["exact"]) or 0.0) for c in checks], marker=".",
                            label=_short(name, 60))[0]
        points = [(c["position"], 100 * v) for c in checks if (v := as_number(c.get("local_exact"))) is not None]
        if points:
            local.plot(*zip(*points), marker=".", color=line.get_color())
    through.set_title("Through the network (drift)")
    local.set_title("Locally (each op fed the simulation's codes)")
    for ax in (through, local):
        ax.set_xlabel("quantized tensor (graph order)")
        ax.grid(alpha=0.3)
    through.set_ylabel("codes equal to the simulation's (%)")
    fig.legend(loc="outside lower center", fontsize=7, ncols=2)
    return fig


@_drawn("mixed")
def precision_counts(mixed: dict[str, Any]) -> Figure | None:
    """How many layers the mixed-precision search put at each qconfig (or in float)."""
    counts = {str(k): int(v) for k, v in (mixed.get("counts") or {}).items()}
    if not counts:
        return None
    fig = _figure(0.8 + 0.3 * len(counts))
    ax = fig.add_subplot()
    names = sorted(counts)
    ax.barh(range(len(names)), [counts[n] for n in names], color="#64b5cd")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("layers")
    ax.set_title("Mixed-precision assignment: layers per qconfig")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig
