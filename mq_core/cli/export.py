"""``mq export``, ``mq verify`` and ``mq exporters``: working from a saved prepared checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from torch import nn

from mq_core.checkpoint import inputs_from_specs, load_checkpoint, restore
from mq_core.cli.loading import build_model, load_tensor_file, parse_key_value
from mq_core.cli.quantize import DEMO_MODEL_REF
from mq_core.errors import ConfigError
from mq_core.export import ExportResult
from mq_core.pipeline.export import export
from mq_core.pipeline.verify import inputs_like, verify
from mq_core.pipeline.verify_layers import verify_layers
from mq_core.plugins.manager import get_manager
from mq_core.summary import checkpoint_summary, summary
from mq_core.text import render_table

#: Model factories a checkpoint may name without the user's confirmation: mq's own, listed one by one (a prefix such
#: as "mq_core." would also admit "mq_core.cli.main:main" and every other function mq ships).
TRUSTED_MODEL_REFS = frozenset({DEMO_MODEL_REF})

_MODEL_OPTION = click.option("--model", "model_ref",
                             help="Float model factory 'pkg.module:factory' to call instead of the recorded one.")
_TRUST_OPTION = click.option(
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
    return restore(build_model(ref), checkpoint, trust=trust)


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@_MODEL_OPTION
@_TRUST_OPTION
@click.option("--exporter", help="Exporter name (default: the backend's default; see `mq exporters`).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: next to the checkpoint).")
@click.option("-o", "--option", "options", multiple=True, help="Exporter option key=value (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_command(checkpoint: str, model_ref: str | None, trust: bool, exporter: str | None, out: str | None,
                   options: tuple[str, ...], as_json: bool) -> None:
    """Export a saved prepared checkpoint (from `mq quantize` or mq.save_checkpoint) to a target's artifacts."""
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
@_MODEL_OPTION
@_TRUST_OPTION
@click.option("--inputs", "inputs_file", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.pt/.npy tensor). Default: 4 seeded random samples of the recorded input shape.")
@click.option("--runtime", "runtimes", multiple=True, help="Runtime to use (repeatable; default: the backend's).")
@click.option("--tolerance", type=float, help="Allowed difference in steps (default: each runtime's, else 1).")
@click.option("--layers", is_flag=True,
              help="Also compare every quantized tensor, through the network and one op at a time (two more runs per "
                   "artifact and runtime); reported beside the verdict, which it does not change.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify_command(export_dir: str, checkpoint: str, model_ref: str | None, trust: bool, inputs_file: str | None,
                   runtimes: tuple[str, ...], tolerance: float | None, layers: bool, as_json: bool) -> None:
    """Run an export folder's artifacts in real runtimes and compare with the simulation, per output.

    Exits with status 1 when any output differs by more than the tolerance, the manifest disagrees with the
    checkpoint, or a runtime crashes or fails on an artifact. With --layers, the layer-wise report (every quantized
    tensor's codes, and each op's local check fed with the simulation's codes) follows, naming the first op that
    breaks locally; the exit status stays the outputs' verdict.
    """
    qmodel, record = restore_checkpoint(checkpoint, model_ref, trust)
    if inputs_file:
        inputs = inputs_like(load_tensor_file(inputs_file, what="inputs"), record["inputs"], f"--inputs {inputs_file}")
    else:
        specs = [{**s, "shape": [4, *s["shape"][1:]]} for s in record["inputs"]]
        inputs = inputs_from_specs(specs, seed=1)
    result = ExportResult.load(export_dir)
    report = verify(result, inputs, runtimes=list(runtimes) or None, tolerance=tolerance, qmodel=qmodel)
    layer_report = verify_layers(result, inputs, runtimes=list(runtimes) or None, qmodel=qmodel) if layers else None
    if as_json:
        data = report.to_dict()
        if layer_report is not None:
            data["layers"] = layer_report.to_dict()
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(report.table())
        failed = f"; {len(report.failures)} failed check(s) above" if report.failures else ""
        click.echo(f"{'PASS' if report.passed else 'FAIL'}: worst {report.worst_steps:.3g} steps{failed}")
        if layer_report is not None:
            click.echo("\nLayer-wise (codes of every quantized tensor; local: its op fed the simulation's codes):")
            click.echo(layer_report.table())
    if not report.passed:
        raise SystemExit(1)


@click.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@_MODEL_OPTION
@_TRUST_OPTION
def inspect_command(checkpoint: str, model_ref: str | None, trust: bool) -> None:
    """Show a saved prepared model's quantizers: what each quantizes and why, grid, observer, qparams.

    A checkpoint whose model factory you have not confirmed (--model, --trust-model-ref) is shown from its data
    alone, without building the model or importing anything it names: safe on files from anywhere.
    """
    record = load_checkpoint(checkpoint)
    untrusted = _untrusted_ref(record, model_ref, trust)
    if untrusted or not (model_ref or record.get("model_ref")):
        click.echo(checkpoint_summary(record))
        if untrusted:
            reason = (f"it names its float model factory {untrusted!r}, which mq calls only when you confirm it. "
                      "For the full summary (placement reasons, observers), pass --trust-model-ref if you trust this "
                      "file, or --model package.module:factory")
        else:
            reason = ("it does not record its float model factory. For the full summary (placement reasons, "
                      "observers), pass --model package.module:factory")
        click.echo(f"The model was not rebuilt: {reason}.")
        return
    click.echo(summary(_rebuild(checkpoint, record, model_ref, trust)))


@click.command("exporters")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def exporters_command(as_json: bool) -> None:
    """Installed exporters: the backends they serve and their options (-o key=value) with defaults."""
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
