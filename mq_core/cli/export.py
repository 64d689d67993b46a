"""``mq export``, ``mq verify``, ``mq inspect`` and ``mq exporters``: working from a saved prepared checkpoint.

torch and the pipeline are imported inside the commands (``mq --help`` must not import them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mq_core.cli.options import Names, verbosity_options
from mq_core.cli.quantize import DEMO_MODEL_REF, TEXT_DEMO_MODEL_REF
from mq_core.errors import ConfigError
from mq_core.text import render_table

if TYPE_CHECKING:
    from torch import nn

#: Model factories a checkpoint may name without the user's confirmation: mq's own, listed one by one (a prefix such
#: as "mq_core." would also admit "mq_core.cli.main:main" and every other function mq ships).
TRUSTED_MODEL_REFS = frozenset({DEMO_MODEL_REF, TEXT_DEMO_MODEL_REF})

MODEL_OPTION = click.option("--model", "model_ref",
                             help="Float model factory 'pkg.module:factory' to call instead of the recorded one.")
TRUST_OPTION = click.option(
    "--trust-model-ref", "trust", is_flag=True,
    help="Trust the checkpoint: call the model factory it records and import the modules its skip/leaf/observer "
         "entries name. Only for files from a source you trust.",
)


def _untrusted_ref(checkpoint: dict[str, Any], model_ref: str | None, trust: bool) -> str | None:
    """The recorded model factory the user has not confirmed (None when there is nothing to confirm)."""
    ref = checkpoint.get("model_ref")
    if model_ref or trust or not ref or ref in TRUSTED_MODEL_REFS:
        return None
    return ref


def restore_checkpoint(path: str, model_ref: str | None, trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint and rebuild its prepared model (see ``_rebuild``)."""
    from mq_core.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    return _rebuild(path, checkpoint, model_ref, trust), checkpoint


def _rebuild(path: str, checkpoint: dict[str, Any], model_ref: str | None, trust: bool) -> nn.Module:
    """The prepared model of a loaded checkpoint. The float architecture comes from ``--model``, or from the
    recorded factory when the user trusts the file (``--trust-model-ref``) or it is one of mq's own: calling a
    factory named by a file would run whatever code the file names."""
    ref = model_ref or checkpoint.get("model_ref")
    if not ref:
        raise ConfigError(f"checkpoint {path} does not record how to build its float model: pass "
                          "--model package.module:factory (the factory used when it was quantized).")
    untrusted = _untrusted_ref(checkpoint, model_ref, trust)
    if untrusted:
        raise ConfigError(
            f"checkpoint {path} asks to build its float model by calling {untrusted!r}, and mq calls code named by a "
            "file only when you confirm it. If you trust this file, pass --trust-model-ref; or pass --model "
            f"package.module:factory yourself. `mq inspect {path}` shows what the file holds without running anything."
        )
    from mq_core.checkpoint import restore
    from mq_core.cli.loading import build_model

    return restore(build_model(ref), checkpoint, trust=trust)


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@MODEL_OPTION
@TRUST_OPTION
@click.option("--exporter", type=Names("exporter"),
              help="Exporter name (default: the backend's default; see `mq exporters`).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: next to the checkpoint).")
@click.option("-o", "--option", "options", multiple=True, help="Exporter option key=value (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@verbosity_options()
def export_command(checkpoint: str, model_ref: str | None, trust: bool, exporter: str | None, out: str | None,
                   options: tuple[str, ...], as_json: bool) -> None:
    """Export a saved prepared checkpoint (from `mq quantize` or mq.save_checkpoint) to a target's artifacts."""
    from mq_core.checkpoint import inputs_from_specs
    from mq_core.cli.loading import parse_key_value
    from mq_core.pipeline.export import export

    qmodel, record = restore_checkpoint(checkpoint, model_ref, trust)
    inputs = inputs_from_specs(record["inputs"])
    folder = Path(out) if out else Path(checkpoint).parent / (exporter or "export")
    result = export(qmodel, inputs, folder, exporter,
                    **dict(parse_key_value(o, "exporter options") for o in options))
    if as_json:
        click.echo(json.dumps(result.manifest, indent=2, sort_keys=True))
        return
    click.echo(f"exported {result.backend} ({result.exporter}) to {result.out_dir}")
    click.echo(render_table(["kind", "file", "description"],
                            [[a.kind, a.path.name, a.description] for a in result.artifacts]))


@click.command("verify")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The prepared checkpoint the export came from (the simulation to compare with).")
@MODEL_OPTION
@TRUST_OPTION
@click.option("--inputs", "inputs_file", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.pt/.npy tensor). Default: 4 seeded random samples of the recorded input shape.")
@click.option("--runtime", "runtimes", multiple=True, type=Names("runtime", extra=("all",)),
              help="Runtime to use (repeatable; default: the backend's).")
@click.option("--tolerance", type=float, help="Allowed difference in steps (default: each runtime's, else 1).")
@click.option("--layers/--no-layers", "layers", default=True, show_default=True,
              help="Run the layer-wise check (every quantized tensor, and each op fed the simulation's codes; two "
                   "more runs per artifact and runtime) that tells drift from error. Without it an output passes only "
                   "within the tolerance.")
@click.option("--all-layers", is_flag=True, help="Print the layer-wise table (one row per quantized tensor).")
@click.option("--integer-sim", is_flag=True,
              help="Compare with the integer-exact simulation of ONNX Runtime's integer kernels "
                   "(mq.integer_simulation) instead of the float one; the runtime defaults to onnxruntime-opt.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@verbosity_options()
def verify_command(export_dir: str, checkpoint: str, model_ref: str | None, trust: bool, inputs_file: str | None,
                   runtimes: tuple[str, ...], tolerance: float | None, layers: bool, all_layers: bool,
                   integer_sim: bool, as_json: bool) -> None:
    """Run an export folder's artifacts in real runtimes and compare with the simulation, per output and per op.

    Exits with status 1 when an op breaks locally (its output more than one step from the simulation's, or under
    99% exact, when fed the simulation's input codes), an output drifts beyond the tolerance further than
    quantization itself moves it from float, the manifest disagrees with the checkpoint, or a runtime crashes or
    fails on an artifact. The report names the first op that breaks (docs/design.md, "Verification verdict").
    """
    from mq_core.checkpoint import inputs_from_specs
    from mq_core.cli.loading import load_tensor_file
    from mq_core.export import ExportResult
    from mq_core.graph.integer_sim import integer_simulation
    from mq_core.pipeline.verify import inputs_like, verify

    qmodel, record = restore_checkpoint(checkpoint, model_ref, trust)
    if integer_sim:
        runtimes = runtimes or ("onnxruntime-opt",)
        integer_simulation(qmodel, "onnxruntime-opt")
    if inputs_file:
        inputs = inputs_like(load_tensor_file(inputs_file, what="inputs"), record["inputs"], f"--inputs {inputs_file}")
    else:
        specs = [{**s, "shape": [4, *s["shape"][1:]]} for s in record["inputs"]]
        inputs = inputs_from_specs(specs, seed=1)
    result = ExportResult.load(export_dir)
    report = verify(result, inputs, runtimes=list(runtimes) or None, tolerance=tolerance, qmodel=qmodel,
                    layers=layers)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(report.table(layers=all_layers))
        failed = f"; {len(report.failures)} failed check(s) above" if report.failures else ""
        broken = report.first_broken()
        first = next(iter(broken.values()), None)
        where = f"; first op that breaks locally: {first.op} -> tensor {first.tensor!r}" if first else ""
        click.echo(f"{'PASS' if report.passed else 'FAIL'}: worst {report.worst_steps:.3g} steps{where}{failed}")
    if not report.passed:
        raise SystemExit(1)


@click.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@MODEL_OPTION
@TRUST_OPTION
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable: backend, qconfig, mode and per quantizer its grid, qparams (scale and zero "
                   "point lists) and switches; `rebuilt` says whether the model was rebuilt.")
@verbosity_options()
def inspect_command(checkpoint: str, model_ref: str | None, trust: bool, as_json: bool) -> None:
    """Show a saved prepared model's quantizers: what each quantizes and why, grid, observer, qparams.

    A checkpoint whose model factory you have not confirmed (--model, --trust-model-ref) is shown from its data
    alone, without building the model or importing anything it names: safe on files from anywhere.
    """
    from mq_core.checkpoint import load_checkpoint
    from mq_core.summary import checkpoint_data, checkpoint_summary, summary, summary_data

    record = load_checkpoint(checkpoint)
    untrusted = _untrusted_ref(record, model_ref, trust)
    if untrusted or not (model_ref or record.get("model_ref")):
        if untrusted:
            reason = (f"it names its float model factory {untrusted!r}, which mq calls only when you confirm it. "
                      "For the full summary (placement reasons, observers), pass --trust-model-ref if you trust this "
                      "file, or --model package.module:factory")
        else:
            reason = ("it does not record its float model factory. For the full summary (placement reasons, "
                      "observers), pass --model package.module:factory")
        if as_json:
            _echo_json({"rebuilt": False, "reason": f"The model was not rebuilt: {reason}.",
                        **checkpoint_data(record)})
            return
        click.echo(checkpoint_summary(record))
        click.echo(f"The model was not rebuilt: {reason}.")
        return
    qmodel = _rebuild(checkpoint, record, model_ref, trust)
    if as_json:
        _echo_json({"rebuilt": True, **summary_data(qmodel)})
        return
    click.echo(summary(qmodel))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.command("exporters")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@verbosity_options()
def exporters_command(as_json: bool) -> None:
    """Installed exporters: the backends they serve and their options (-o key=value) with defaults."""
    from mq_core.plugins.manager import get_manager

    rows = []
    for entry in sorted(get_manager().registries["exporter"].entries(), key=lambda e: e.name):
        exporter = entry.obj
        options = {f.name: f.default for f in dataclasses.fields(exporter.Options)}
        rows.append({"name": entry.name, "backends": list(exporter.backends), "options": options,
                     "description": exporter.description, "provided_by": entry.distribution})
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    click.echo(render_table(
        ["exporter", "backends", "options", "package"],
        [[r["name"], ", ".join(r["backends"]), ", ".join(f"{k}={v}" for k, v in r["options"].items()),
          r["provided_by"]] for r in rows],
    ))
