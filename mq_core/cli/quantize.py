"""``mq quantize``: the main job, on the built-in digits demo or on the user's own model.

Without ``--model`` it quantizes a small CNN trained on scikit-learn's bundled digits (trained once, cached) for
the default backend. Every option can also come from a TOML file (``--config``); flags given on the command line
win over the file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from mq_core.cli.loading import build_model, calibration_batches, load_object, parse_key_value
from mq_core.cli.table import render_table
from mq_core.errors import ConfigError
from mq_core.plugins.lookup import get_ptq_method, list_backends
from mq_core.workflow import QuantizeSummary, quantize_for_backends

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_BACKEND = "qdq"
DEMO_MODEL_REF = "mq_core.demo.digits:DigitsCNN"
#: Keys a --config TOML file may hold (the long option names, with - or _).
CONFIG_KEYS = {"model", "weights", "calib", "eval", "backend", "qconfig", "method", "method_options", "out",
               "batch_size", "num_batches", "image_size", "module", "skip", "leaf_module", "quiet"}


def _read_config(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it as TOML ({exc}).") from exc
    if "quantize" in data:  # keys sit either at the top level or under [quantize], not both
        stray = sorted(set(data) - {"quantize"})
        if stray:
            raise ConfigError(f"--config {path}: {stray} sit outside the [quantize] table and would be ignored; move "
                              "them under it (method options as a [quantize.method_options] table).")
        data = data["quantize"]
    config = {k.replace("-", "_"): v for k, v in data.items()}
    if "eval" in config:
        config["eval_ref"] = config.pop("eval")
    unknown = sorted(set(config) - CONFIG_KEYS - {"eval_ref"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; valid keys are {sorted(CONFIG_KEYS)}.")
    if not isinstance(config.get("method_options", {}), dict):
        raise ConfigError(f"--config {path}: method_options must be a table (e.g. [quantize.method_options] with "
                          f"iterations = 500), got {config['method_options']!r}.")
    return config


def _merge(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """Command-line values win; then the config file; then the defaults."""
    config = _read_config(params["config"]) if params.get("config") else {}
    merged = dict(params)
    for key, value in config.items():
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = tuple(value) if isinstance(value, list) else value
    return merged


def _demo(progress: bool) -> tuple[nn.Module, list[Any], Callable[[nn.Module], float], tuple[torch.Tensor, ...]]:
    from mq_core.demo import digits

    data = digits.load_digits()
    model = digits.pretrained("cnn", progress=progress)
    return (model, data.calibration_batches(), lambda m: digits.accuracy(m, data.x_test, data.y_test),
            (data.x_test[:64],))


def _eval_function(ref: str | None) -> Callable[[nn.Module], float] | None:
    if not ref:
        return None
    fn = load_object(ref, "eval")
    if not callable(fn):
        raise ConfigError(f"--eval {ref!r} is not callable; it must be a function taking the model, returning a float.")
    return fn


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def render_summary(summary: QuantizeSummary, title: str) -> str:
    lines = [title]
    if summary.float_accuracy is not None:
        lines.append(f"float accuracy: {summary.float_accuracy:.2f}%")
    rows = []
    for o in summary.outcomes:
        if o.error:
            rows.append([o.backend, "-", "-", "-", "-", "error", "-", "FAIL"])
            continue
        deployed = _fmt(o.deployed_accuracy) + (f" ({o.deployed_runtime})" if o.deployed_runtime else "")
        agreement = "; ".join(f"{runtime} {steps:.3g} ({100 * exact:.1f}% exact)"
                              for runtime, (steps, exact) in o.agreement().items())
        rows.append([o.backend, o.qconfig + (f" + {o.method}" if o.method else ""), _fmt(o.sim_accuracy), deployed,
                     agreement, str(len([a for r in o.results.values() for a in r.artifacts])),
                     f"{sum(o.timings.values()):.1f}s", "PASS" if o.passed else "FAIL"])
    lines.append(render_table(["backend", "qconfig", "simulated acc", "deployed acc (runtime)",
                               "sim vs runtime: max steps (exact)",
                               "artifacts", "time", "result"], rows))
    for o in summary.outcomes:
        if o.error:
            lines.append(f"\n{o.backend}: {o.error}")
            continue
        lines.append(f"\n{o.backend}: checkpoint {o.checkpoint}")
        for result in o.results.values():
            for artifact in result.artifacts:
                lines.append(f"  {result.exporter:<16} {artifact.kind:<22} {artifact.path}")
        lines.append("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in o.timings.items()))
        lines.extend(f"  note: {note}" for note in o.notes)
        for exporter, report in o.reports.items():
            if not report.passed:
                lines.append(f"  verification of {exporter} FAILED:\n" + report.table())
    lines.append("\n" + ("PASS: every artifact agrees with the simulation within tolerance." if summary.passed
                         else "FAIL: see above."))
    return "\n".join(lines)


def _summary_json(summary: QuantizeSummary) -> dict[str, Any]:
    return {
        "passed": summary.passed,
        "float_accuracy": summary.float_accuracy,
        "out_dir": str(summary.out_dir),
        "backends": [
            {"backend": o.backend, "qconfig": o.qconfig, "method": o.method, "passed": o.passed, "error": o.error,
             "simulated_accuracy": o.sim_accuracy, "deployed_accuracy": o.deployed_accuracy,
             "deployed_runtime": o.deployed_runtime, "checkpoint": str(o.checkpoint) if o.checkpoint else None,
             "artifacts": {e: [str(a.path) for a in r.artifacts] for e, r in o.results.items()},
             "verification": {e: r.to_dict() for e, r in o.reports.items()}, "timings": o.timings}
            for o in summary.outcomes
        ],
    }


@click.command("quantize")
@click.option("--model", help="Float model factory 'pkg.module:factory' returning an nn.Module (default: the "
                               "built-in digits CNN demo).")
@click.option("--weights", help="State dict for --model (.pt), loaded with torch.load(weights_only=True).")
@click.option("--calib", help="Calibration data: a .pt/.npy tensor [N, ...], a folder of images, or "
                              "'pkg.module:loader_factory'. Required with --model.")
@click.option("--eval", "eval_ref", help="Accuracy function 'pkg.module:fn'; fn(model) -> float (percent).")
@click.option("--backend", default=DEFAULT_BACKEND, show_default=True,
              help="Target backend name, or 'all' for every installed backend.")
@click.option("--qconfig", help="Qconfig preset (e.g. w8a8, w4a4, reduce-range; see docs).")
@click.option("--method", help="PTQ method after calibration (adaround, brecq, qdrop; needs mq-algos).")
@click.option("--method-option", "method_option", multiple=True,
              help="PTQ method option key=value, e.g. iterations=500 (repeatable; see docs/algorithms.md).")
@click.option("--out", default="mq-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (one sub-folder per backend).")
@click.option("--batch-size", default=32, show_default=True, help="Batch size for tensor/image calibration data.")
@click.option("--num-batches", type=int, help="Use at most this many calibration batches.")
@click.option("--image-size", default=224, show_default=True, help="Side of images read from a --calib folder.")
@click.option("--module", multiple=True, help="Quantize only this sub-module (repeatable).")
@click.option("--skip", multiple=True, help="Leave this layer in float (module name; repeatable).")
@click.option("--leaf-module", multiple=True, help="Do not trace into this module (name; repeatable).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML file with the same keys.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def quantize_command(ctx: click.Context, **params: Any) -> None:
    """Quantize a model for a target, export its artifacts, verify them in real runtimes, report accuracy.

    Exit status: 0 when every artifact agrees with the simulation, 1 when verification fails, 2 on bad input.
    """
    p = _merge(ctx, params)
    progress = not p["quiet"] and not p["as_json"]
    method_options = dict(p.get("method_options") or {})
    method_options.update(parse_key_value(o, "--method-option values") for o in p["method_option"])
    if method_options and not p["method"]:
        raise ConfigError(f"PTQ method options {sorted(method_options)} were given without --method; name the "
                          "method they are for (adaround, brecq or qdrop).")
    if p["method"]:  # unknown methods and bad options fail now, not after training the model and calibrating
        get_ptq_method(p["method"]).make_config(**method_options)
    if p["model"]:
        if not p["calib"]:
            raise ConfigError("missing calibration data: with --model, pass --calib (a .pt/.npy tensor file, a "
                              "folder of images, or 'pkg.module:loader_factory').")
        model = build_model(p["model"], p["weights"])
        calib = calibration_batches(p["calib"], p["batch_size"], p["image_size"])
        eval_fn, verify_inputs = _eval_function(p["eval_ref"]), None
        title, model_ref = f"mq quantize: {p['model']}", p["model"]
    else:
        model, calib, eval_fn, verify_inputs = _demo(progress)
        title, model_ref = "mq quantize: built-in demo (DigitsCNN on scikit-learn digits)", DEMO_MODEL_REF
    if p["num_batches"]:
        calib = calib[: p["num_batches"]]
    backends = list_backends() if p["backend"] == "all" else [p["backend"]]
    summary = quantize_for_backends(
        model, backends, calib, p["out"], eval_fn=eval_fn, keep_going=p["backend"] == "all",
        qconfig=p["qconfig"], method=p["method"], method_options=method_options or None,
        verify_inputs=verify_inputs, model_ref=model_ref, progress=progress,
        prepare_options={"modules": list(p["module"]) or None, "skip": list(p["skip"]),
                         "leaf_modules": list(p["leaf_module"])},
    )
    click.echo(json.dumps(_summary_json(summary), indent=2) if p["as_json"] else render_summary(summary, title))
    if not summary.passed:
        raise SystemExit(1)
