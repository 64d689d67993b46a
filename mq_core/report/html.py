"""``report.html``: one self-contained page from the report.json dict (``mq_core.report.data``).

Everything is inline: the style sheet, and each figure as an ``<svg>`` element (``mq_core.report.figures``). The
page has no script and refers to no URL, font or file, so it opens offline, from an e-mail attachment or a CI
artifact alike. Every section is always there; one with nothing to show says so in one line.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mq_core.report import figures
from mq_core.report.data import as_number

log = logging.getLogger(__name__)

#: The page's sections, in order: (id, title).
SECTIONS = (("summary", "Summary"), ("sqnr", "Per-layer SQNR"), ("ranges", "Ranges and clipping"),
            ("sensitivity", "Sensitivity ranking"), ("verification", "Layer-wise verification"),
            ("mixed-precision", "Mixed precision"))
#: Rows of the sensitivity table (report.json holds every quantizer).
MAX_TABLE_ROWS = 30
INSTALL_HINT = 'pip install "mq-core[report]"'
#: Marks a page mq wrote (``mq_core.report.write_report`` replaces only those).
GENERATOR = '<meta name="generator" content="mq">'

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}
.empty,.note{color:#666;font-style:italic}figure{margin:1em 0}figure svg{max-width:100%;height:auto}
code{font-size:.9em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table; cells are HTML already (escape text with ``_e``), ``numeric`` columns are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "-"
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _percent(value: Any) -> str:
    number = as_number(value)
    return "-" if number is None else f"{number:.2f}%"


def _number(value: Any, digits: int = 3) -> str:
    number = as_number(value)
    if number is None:
        return "-"
    return "exact" if number == math.inf else f"{number:.{digits}g}"


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _relative(path: str, out_dir: str) -> str:
    try:
        return str(Path(path).relative_to(out_dir))
    except ValueError:
        return path


def _summary(data: dict[str, Any]) -> str:
    summary = data["summary"]
    if summary is None:
        return _empty("No quantize run in this report (a saved checkpoint was analysed): no accuracies, artifacts "
                      "or verification.")
    parts = [f"<p>Float accuracy: <b>{_percent(summary.get('float_accuracy'))}</b>. Overall: "
             f"{_verdict(summary.get('passed'))}.</p>"]
    rows = []
    for b in summary.get("backends", []):
        if b.get("error"):
            rows.append([_e(b["backend"]), "-", "-", "-", "-", f"error: {_e(b['error'])}", _verdict(False)])
            continue
        deployed = _percent(b.get("deployed_accuracy"))
        if b.get("deployed_runtime"):
            deployed += f" ({_e(b['deployed_runtime'])})"
        verification = "<br>".join(
            f"{_e(exporter)}: {_verdict(report.get('passed'))}" + "".join(
                f"; {_e(c['runtime'])} {_e(c['output'])} {_number(c.get('max_steps'))} steps, "
                f"{100 * (as_number(c.get('exact')) or 0):.1f}% exact" for c in report.get("checks", []))
            for exporter, report in (b.get("verification") or {}).items())
        artifacts = "<br>".join(f"{_e(exporter)}: " + ", ".join(
            f"<code>{_e(_relative(p, summary.get('out_dir', '')))}</code>" for p in paths)
            for exporter, paths in (b.get("artifacts") or {}).items())
        qconfig = _e(b.get("qconfig", "")) + (f" + {_e(b['method'])}" if b.get("method") else "")
        rows.append([_e(b["backend"]), qconfig, _percent(b.get("simulated_accuracy")), deployed, artifacts,
                     verification or "-", _verdict(b.get("passed"))])
    parts.append(_table(["backend", "qconfig", "simulated acc", "deployed acc (runtime)", "artifacts",
                         "verification (sim vs runtime)", "result"], rows))
    return "".join(parts)


def _figure(name: str, draw: Callable[[], str | None], plots: bool) -> str:
    if not plots:
        return ""
    svg = draw()
    return "" if svg is None else f'<figure id="fig-{name}">{svg}</figure>'


def _no_sensitivity() -> str:
    return _empty("No sensitivity analysis in this run (mq quantize --no-report skips it; mq analyze runs it).")


def _sqnr(data: dict[str, Any], plots: bool) -> str:
    sensitivity = data["sensitivity"]
    if sensitivity is None:
        return _no_sensitivity()
    if not plots:
        return _empty(_plots_missing())
    return _figure("sqnr", lambda: figures.sqnr_bars(sensitivity), plots) or _empty("No quantizer has an SQNR.")


def _ranges(data: dict[str, Any], plots: bool) -> str:
    sensitivity = data["sensitivity"]
    if sensitivity is None:
        return _no_sensitivity()
    rows = [[_e(q["name"]), _e(q["role"]), _number(q.get("min"), 4), _number(q.get("max"), 4),
             _number(q.get("clip_lo"), 4), _number(q.get("clip_hi"), 4),
             f"{100 * (as_number(q.get('clipped_fraction')) or 0):.3g}%"]
            for q in sensitivity.get("quantizers", [])]
    table = _table(["quantizer", "role", "min", "max", "clip low", "clip high", "clipped"], rows,
                   numeric=(2, 3, 4, 5, 6))
    return _figure("ranges", lambda: figures.range_histograms(sensitivity), plots) + table


def _sensitivity(data: dict[str, Any], plots: bool) -> str:
    sensitivity = data["sensitivity"]
    if sensitivity is None:
        return _no_sensitivity()
    metric = sensitivity.get("metric", "")
    baseline = sensitivity.get("baseline") or {}
    what = "output SQNR against the float model (dB)" if metric == "sqnr_db" else "the evaluation metric"
    intro = (f"<p>End-to-end metric: {_e(what)}. Float model: {_number(baseline.get('float'), 4)}; fully "
             f"quantized: {_number(baseline.get('quantized'), 4)}. Most sensitive first.</p>")
    by_name = {q["name"]: q for q in sensitivity.get("quantizers", [])}
    ranked = [by_name[n] for n in sensitivity.get("ranking", []) if n in by_name]
    rows = [[str(i + 1), _e(q["name"]), _e(q.get("layer", "")), _e(q["role"]), _e(q.get("bits", "")),
             _number(q.get("sqnr_db")), _number(q.get("only_quantized"), 4), _number(q.get("only_float"), 4)]
            for i, q in enumerate(ranked[:MAX_TABLE_ROWS])]
    more = (f'<p class="note">{len(ranked) - MAX_TABLE_ROWS} more in report.json.</p>'
            if len(ranked) > MAX_TABLE_ROWS else "")
    table = _table(["#", "quantizer", "layer", "role", "bits", "tensor SQNR (dB)", "only this on",
                    "all on but this"], rows, numeric=(0, 4, 5, 6, 7)) if rows else _empty("No ranking.")
    return intro + _figure("ranking", lambda: figures.ranking_bars(sensitivity), plots) + table + more


def _verification(data: dict[str, Any], plots: bool) -> str:
    verification = data["verification"]
    if verification is None:
        return _empty("No layer-wise verification in this run (it runs with every verified export).")
    rows = []
    for layer in verification["layers"]:
        broken = {(b["artifact"], b["runtime"]): b for b in layer.get("first_broken", [])}
        for artifact, runtime in dict.fromkeys((c["artifact"], c["runtime"]) for c in layer.get("checks", [])):
            run = [c for c in layer["checks"] if c["artifact"] == artifact and c["runtime"] == runtime]
            local = [c for c in run if c.get("local_passed") is not None]
            first = broken.get((artifact, runtime))
            rows.append([
                _e(layer["backend"]), _e(layer["exporter"]), _e(artifact), _e(runtime),
                f"{sum(bool(c['local_passed']) for c in local)}/{len(local)}",
                "none" if first is None else f'<span class="fail">{_e(first["op"])} -&gt; {_e(first["tensor"])}</span>',
                f"{100 * (as_number(run[-1]['exact']) or 0):.1f}%", _verdict(first is None and bool(local))])
        for line in [*layer.get("failures", []), *layer.get("notes", [])]:
            rows.append([_e(layer["backend"]), _e(layer["exporter"]), "-", "-", "-", _e(line), "-", "-"])
    intro = ("<p>Every quantized tensor of every artifact, in integer codes, against the simulation. <i>Locally</i>: "
             "each op fed the simulation's codes, so only an error in the artifact (scale, zero point, rounding, "
             "placement) breaks it; <i>through the network</i>: the drift that float summation order causes, "
             f"judged by <code>verify</code>'s verdict. Overall: {_verdict(verification.get('passed'))}.</p>")
    table = _table(["backend", "exporter", "artifact", "runtime", "local checks passed", "first op that breaks",
                    "exact at the last tensor", "local"], rows, numeric=(4, 6))
    return intro + _figure("verification", lambda: figures.verification_lines(verification["layers"]), plots) + table


def _mixed_precision(data: dict[str, Any], plots: bool) -> str:
    mixed = data["mixed_precision"]
    if mixed is None:
        return _empty("No mixed-precision search in this run (mq quantize --accuracy-budget runs one).")
    metric = "output SQNR (dB)" if mixed.get("metric") == "sqnr_db" else "evaluation metric"
    size, size_all8 = as_number(mixed.get("size_bytes")), as_number(mixed.get("size_all8_bytes"))
    ratio = f" ({100 * size / size_all8:.0f}% of all 8-bit)" if size is not None and size_all8 else ""
    intro = (f"<p>Budget {_number(mixed.get('budget'), 4)} points of the {_e(metric)} from the reference "
             f"{_number(mixed.get('reference'), 4)}; the chosen assignment reaches <b>{_number(mixed.get('score'), 4)}"
             f"</b>. Weights: {_number(size, 6)} bytes{ratio}; all 8-bit: {_number(size_all8, 6)} bytes.</p>")
    assignment = _table(["layer", "qconfig"], [[_e(k), _e(v)] for k, v in (mixed.get("assignment") or {}).items()])
    steps = mixed.get("steps") or []
    moves = _table(["#", "layer", "from", "to", "score after"],
                   [[str(i + 1), _e(s["layer"]), _e(s["from"]), _e(s["to"]), _number(s.get("score"), 4)]
                    for i, s in enumerate(steps)], numeric=(0, 4)) if steps else ""
    return (intro + _figure("mixed", lambda: figures.precision_counts(mixed), plots) + assignment
            + ("<h3>Search steps</h3>" + moves if moves else ""))


def _plots_missing() -> str:
    return f"Plots need matplotlib: {INSTALL_HINT}."


def render_html(data: dict[str, Any], plots: bool | None = None) -> str:
    """The page for one report.json dict. ``plots``: draw the figures (default: when matplotlib imports; without it
    the page has the tables and says how to get the plots)."""
    if plots is None:
        plots = figures.available()
    if not plots:
        log.warning("report.html is written without plots: matplotlib is not installed (%s).", INSTALL_HINT)
    render = {"summary": lambda: _summary(data), "sqnr": lambda: _sqnr(data, plots),
              "ranges": lambda: _ranges(data, plots), "sensitivity": lambda: _sensitivity(data, plots),
              "verification": lambda: _verification(data, plots),
              "mixed-precision": lambda: _mixed_precision(data, plots)}
    title = f"mq report: {data.get('model') or 'model'}" + (f" for {data['backend']}" if data.get("backend") else "")
    header = (f"<h1>{_e(title)}</h1><p>mq {_e(data.get('mq_version', ''))}. The data behind this page is in "
              "<code>report.json</code> beside it.</p>")
    if not plots:
        header += f'<p class="note">{_e(_plots_missing())}</p>'
    body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{render[sid]()}</section>' for sid, name in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{header}{body}</body></html>\n")
