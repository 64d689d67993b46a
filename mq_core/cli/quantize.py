"""``mq quantize``: the main job, on the built-in digits demo or on the user's own model.

Without ``--model`` it quantizes a small CNN trained on scikit-learn's bundled digits (trained once, cached) for
the default backend. Every option can also come from a TOML file (``--config``); flags given on the command line
win over the file.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mq_core.cli.options import DEVICE, Names, Shape, is_quiet, verbosity_options
from mq_core.errors import ConfigError, MQError, describe_exception

if TYPE_CHECKING:
    import torch
    from torch import nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_BACKEND = "qdq"
DEMO_MODEL_REF = "mq_core.demo.digits:DigitsCNN"
TEXT_DEMO_MODEL_REF = "mq_core.demo.text:TextClassifier"
#: ``--demo`` name -> (the demo model's factory, the summary's title).
DEMOS = {"digits": (DEMO_MODEL_REF, "built-in demo (DigitsCNN on scikit-learn digits)"),
         "text": (TEXT_DEMO_MODEL_REF, "built-in text demo (2-layer transformer encoder, review sentiment)")}
#: Keys a --config TOML file may hold (the long option names, with - or _).
CONFIG_KEYS = {"model", "weights", "calib", "eval", "backend", "qconfig", "method", "method_options", "out",
               "batch_size", "num_batches", "image_size", "module", "skip", "leaf_module", "quiet", "observer",
               "device", "input_shape", "capture", "report", "demo", "accuracy_budget"}
#: The TOML value types an option's click type takes besides a string (which is converted as on the command line).
_NATIVE_TYPES: tuple[tuple[type[click.ParamType], type | tuple[type, ...], str], ...] = (
    (click.types.BoolParamType, bool, "true or false"),
    (click.types.IntParamType, int, "an integer"),
    (click.types.FloatParamType, (int, float), "a number"),
)


def _read_config(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); TOML files must be UTF-8, save it in that encoding.") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it as TOML ({exc}).") from exc
    if "quantize" in data:  # keys sit either at the top level or under [quantize], not both
        stray = sorted(set(data) - {"quantize"})
        if stray:
            raise ConfigError(f"--config {path}: {stray} sit outside the [quantize] table and would be ignored; move "
                              "them under it (method options as a [quantize.method_options] table).")
        data = data["quantize"]
    config = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; valid keys are {sorted(CONFIG_KEYS)}.")
    if not isinstance(config.get("method_options", {}), dict):
        raise ConfigError(f"--config {path}: method_options must be a table (e.g. [quantize.method_options] with "
                          f"iterations = 500), got {config['method_options']!r}.")
    return config


def _toml(value: Any) -> str:
    """A value as it would be written in TOML (near enough: JSON), for error messages."""
    return json.dumps(value, default=str)


def _long(option: click.Option) -> str:
    """The option's long name (``--quiet`` rather than ``-q``), as the TOML key spells it."""
    return next((o for o in option.opts if o.startswith("--")), option.opts[0])


def _config_item(ctx: click.Context, option: click.Option, path: str, key: str, value: Any) -> Any:
    """One TOML value through the option's own click type, so the file is checked exactly like the flag: a string
    is converted as if typed on the command line, any other value must already be of the option's type."""
    native, wanted = next(((t, w) for cls, t, w in _NATIVE_TYPES if isinstance(option.type, cls)), (str, "a string"))
    if not isinstance(value, (str, native)) or (isinstance(value, bool) and native is not bool):
        raise ConfigError(f"--config {path}: {key} = {_toml(value)} must be {wanted} (it sets {_long(option)}).")
    try:
        return option.type.convert(value, option, ctx)
    except click.BadParameter as exc:
        raise ConfigError(f"--config {path}: {key} = {_toml(value)} is not valid for {_long(option)}: "
                          f"{exc.message}") from exc


def _config_value(ctx: click.Context, option: click.Option, path: str, key: str, value: Any) -> Any:
    if not option.multiple:
        if isinstance(value, (list, dict)):
            raise ConfigError(f"--config {path}: {key} = {_toml(value)} must be a single value (it sets "
                              f"{_long(option)}).")
        return _config_item(ctx, option, path, key, value)
    if isinstance(value, str):  # skip = "fc" means ["fc"], as one --skip fc does
        return (_config_item(ctx, option, path, key, value),)
    if not isinstance(value, list):
        raise ConfigError(f"--config {path}: {key} = {_toml(value)} must be a string or a list of strings (it sets "
                          f"{_long(option)}, which is repeatable).")
    return tuple(_config_item(ctx, option, path, f"{key}[{i}]", item) for i, item in enumerate(value))


def _layer_qconfigs(path: str, table: dict[str, Any]) -> dict[str, str]:
    """A ``[qconfig]`` table: per-layer qconfigs, module-path pattern -> preset name or "float" (``mq.prepare``)."""
    for pattern, name in table.items():
        if not isinstance(name, str):
            raise ConfigError(f"--config {path}: qconfig.{pattern} = {_toml(name)} must be a preset name such as "
                              "\"w8a8\", or \"float\" to leave the layer unquantized.")
    return dict(table)


def _merge(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """Command-line values win; then the config file; then the defaults. Every value in the file is validated,
    also one a flag overrides."""
    path = params.get("config")
    config = _read_config(path) if path else {}
    by_flag = {flag: p for p in ctx.command.params if isinstance(p, click.Option) for flag in p.opts}
    merged = dict(params)
    for key, value in config.items():
        option = by_flag.get("--" + key.replace("_", "-"))  # None for method_options, a table of its own
        name = key if option is None else str(option.name)  # eval sets --eval, whose parameter is eval_ref
        if key == "qconfig" and isinstance(value, dict):
            value = _layer_qconfigs(path, value)
        elif option is not None:
            value = _config_value(ctx, option, path, key, value)
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[name] = value
    return merged


def _demo(name: str, progress: bool
          ) -> tuple[nn.Module, list[Any], Callable[[nn.Module], float], tuple[torch.Tensor, ...]]:
    from mq_core.demo import digits

    if name == "text":
        from mq_core.demo import text

        sentences = text.load_text()
        return (text.pretrained(progress=progress), sentences.calibration_batches(),
                lambda m: digits.accuracy(m, sentences.x_test, sentences.y_test), (sentences.x_test[:64],))
    data = digits.load_digits()
    model = digits.pretrained("cnn", progress=progress)
    return (model, data.calibration_batches(), lambda m: digits.accuracy(m, data.x_test, data.y_test),
            (data.x_test[:64],))


def _evaluated(model: nn.Module) -> str:
    from mq_core.pipeline.runtime_module import RuntimeModule

    if isinstance(model, RuntimeModule):
        return f"the exported artifact running in {model.runtime.name}"
    return "the quantized simulation" if hasattr(model, "mq_info") else "the float model"


def eval_function(ref: str | None) -> Callable[[nn.Module], float] | None:
    """The user's accuracy function, checked on every call: an exception it raises, or a result that is not a
    finite number (NaN included: an accuracy is never NaN, so it is a bug in the function), is a ConfigError."""
    if ref is None:
        return None
    import torch

    from mq_core.cli.loading import load_object

    fn = load_object(ref, "eval")
    if not callable(fn):
        raise ConfigError(f"--eval {ref!r} is not callable; it must be a function taking the model, returning a float.")

    def evaluate(model: nn.Module) -> float:
        try:
            value = fn(model)
        except MQError:
            raise
        except Exception as exc:
            raise ConfigError(f"--eval {ref!r} raised on {_evaluated(model)}: {describe_exception(exc)}") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"--eval {ref!r} returned {value!r:.80} ({type(value).__name__}) on "
                              f"{_evaluated(model)}; it must return the accuracy as a finite number (percent).")
        return float(value)

    return evaluate


@click.command("quantize")
@click.option("--model", help="Float model factory 'pkg.module:factory' returning an nn.Module (default: the "
                               "built-in digits CNN demo).")
@click.option("--demo", type=click.Choice(sorted(DEMOS)),
              help="Built-in demo to run without --model: digits (a CNN, the default) or text (a small transformer "
                   "encoder on review sentences). Offline, trained once in seconds and cached.")
@click.option("--weights", help="State dict for --model (.pt), loaded with torch.load(weights_only=True).")
@click.option("--calib", help="Calibration data: a .pt/.npy tensor [N, ...], a folder of images, or "
                              "'pkg.module:loader_factory'. Required with --model.")
@click.option("--eval", "eval_ref", help="Accuracy function 'pkg.module:fn'; fn(model) -> float (percent).")
@click.option("--backend", default=DEFAULT_BACKEND, show_default=True, type=Names("backend", extra=("all",)),
              help="Target backend name, or 'all' for every installed backend.")
@click.option("--qconfig", type=Names("qconfig"), help="Qconfig preset (e.g. w8a8, w4a4, reduce-range; see docs). "
                                                      "Per-layer qconfigs: a [qconfig] table in --config.")
@click.option("--accuracy-budget", "accuracy_budget", type=click.FloatRange(min=0),
              help="Search per-layer bit widths (or float), starting from --qconfig everywhere, within this many "
                   "points of --eval below float (without --eval: dB of output SQNR below all-8-bit).")
@click.option("--observer", type=Names("observer"),
              help="Observer that calibrates the activations: minmax, percentile, mse, kl (default: the qconfig's).")
@click.option("--method", type=Names("ptq_method"),
              help="PTQ method, or several comma-separated, run in order (cle, bias_correction, adaround, brecq, "
                   "qdrop; needs mq-algos), e.g. cle,bias_correction,adaround.")
@click.option("--method-option", "method_option", multiple=True,
              help="PTQ method option key=value, e.g. iterations=500 (repeatable; see docs/algorithms.md).")
@click.option("--out", default="mq-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (one sub-folder per backend).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Batch size for tensor/image calibration data.")
@click.option("--num-batches", type=click.IntRange(min=1),
              help="Use at most this many calibration batches (needed for an endless loader).")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Side of images read from a --calib folder.")
@click.option("--module", multiple=True, help="Quantize only this sub-module (repeatable).")
@click.option("--skip", multiple=True, help="Leave this layer in float (module name; repeatable).")
@click.option("--leaf-module", multiple=True, help="Do not trace into this module (name; repeatable).")
@click.option("--capture", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
              help="Capture front-end: torch.fx, torch.export (HuggingFace transformers), or fx falling back to "
                   "torch.export.")
@click.option("--device", type=DEVICE,
              help="Where to calibrate (and run a PTQ method): cpu or cuda; batches are moved there. Export, "
                   "verification and evaluation run on the CPU.")
@click.option("--input-shape", "input_shape", type=Shape(), multiple=True,
              help="Shape of the example input the model is traced and exported with, batch first, e.g. 1,3,224,224 "
                   "(one per model input; default: the first calibration batch's).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML file with the same keys.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write report.json and report.html into --out (summary, layer-wise verification, sensitivity "
                   "of each quantizer on 8 calibration samples).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbosity_options(expose_quiet=True)
@click.pass_context
def quantize_command(ctx: click.Context, **params: Any) -> None:
    """Quantize a model for a target, export its artifacts, verify them in real runtimes, report accuracy.

    Exit status: 0 when every artifact agrees with the simulation, 1 when verification fails, 2 on bad input.
    """
    from mq_core.cli.loading import build_model, calibration_batches, parse_key_value
    from mq_core.pipeline.ptq import ptq_plan
    from mq_core.pipeline.workflow import quantize_for_backends
    from mq_core.plugins.lookup import list_backends

    p = _merge(ctx, params)
    progress = not (p["quiet"] or is_quiet(ctx) or p["as_json"])
    method_options = dict(p.get("method_options") or {})
    method_options.update(parse_key_value(o, "--method-option values") for o in p["method_option"])
    if method_options and not p["method"]:
        raise ConfigError(f"PTQ method options {sorted(method_options)} were given without --method; name the "
                          "method they are for (adaround, brecq or qdrop).")
    if p["method"]:  # unknown methods and bad options fail now, not after training the model and calibrating
        ptq_plan(p["method"], **method_options)
    calib: Iterable[Any]
    if p["model"] is not None and p["demo"] is not None:
        raise ConfigError(f"--demo {p['demo']} and --model given together: --demo runs a built-in model on its own "
                          "data; pass one of them.")
    if p["model"] is not None:
        if p["calib"] is None:
            raise ConfigError("missing calibration data: with --model, pass --calib (a .pt/.npy tensor file, a "
                              "folder of images, or 'pkg.module:loader_factory').")
        model = build_model(p["model"], p["weights"])
        calib = calibration_batches(p["calib"], p["batch_size"], p["image_size"], num_batches=p["num_batches"])
        eval_fn, verify_inputs = eval_function(p["eval_ref"]), None
        title, model_ref = f"mq quantize: {p['model']}", p["model"]
    else:
        given = [flag for key, flag in (("calib", "--calib"), ("weights", "--weights"), ("eval_ref", "--eval"))
                 if p[key] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} given without --model: without --model mq runs the built-in demo, "
                              "which uses its own weights, data and accuracy function and would ignore them. Pass "
                              "--model pkg.module:factory for your model, or leave them out to run the demo.")
        demo = p["demo"] or "digits"
        model, demo_batches, eval_fn, verify_inputs = _demo(demo, progress)
        calib = demo_batches[: p["num_batches"]]
        model_ref, title = DEMOS[demo]
        title = f"mq quantize: {title}"
    backends = list_backends() if p["backend"] == "all" else [p["backend"]]
    summary = quantize_for_backends(
        model, backends, calib, p["out"], eval_fn=eval_fn, keep_going=p["backend"] == "all", device=p["device"],
        progress=progress, qconfig=p["qconfig"], observer=p["observer"], method=p["method"],
        method_options=method_options or None, input_shapes=list(p["input_shape"]) or None,
        verify_inputs=verify_inputs, model_ref=model_ref, report=p["report"], accuracy_budget=p["accuracy_budget"],
        prepare_options={"modules": list(p["module"]) or None, "skip": list(p["skip"]),
                         "leaf_modules": list(p["leaf_module"]), "capture": p["capture"]},
    )
    click.echo(json.dumps(summary.to_dict(), indent=2) if p["as_json"] else summary.table(title))
    if not summary.passed:
        raise SystemExit(1)
