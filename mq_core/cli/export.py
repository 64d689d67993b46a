"""``mq export``, ``mq verify`` and ``mq exporters``: working from a saved prepared checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from mq_core.checkpoint import inputs_from_specs, load_checkpoint, restore
from mq_core.cli.loading import build_model, load_tensor_file, parse_key_value
from mq_core.cli.table import render_table
from mq_core.errors import ConfigError
from mq_core.export import ExportResult, export
from mq_core.plugins.manager import get_manager
from mq_core.summary import summary
from mq_core.verify import verify


def restore_checkpoint(path: str, model_ref: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the prepared model of a checkpoint (the float architecture comes from ``--model`` or the record)."""
    checkpoint = load_checkpoint(path)
    ref = model_ref or checkpoint.get("model_ref")
    if not ref:
        raise ConfigError(f"checkpoint {path} does not record how to build its float model: pass "
                          "--model package.module:factory (the factory used when it was quantized).")
    return restore(build_model(ref), checkpoint), checkpoint


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_ref", help="Float model factory 'pkg.module:factory' (default: recorded one).")
@click.option("--exporter", help="Exporter name (default: the backend's default; see `mq exporters`).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: next to the checkpoint).")
@click.option("-o", "--option", "options", multiple=True, help="Exporter option key=value (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_command(checkpoint: str, model_ref: str | None, exporter: str | None, out: str | None,
                   options: tuple[str, ...], as_json: bool) -> None:
    """Export a saved prepared checkpoint (from `mq quantize` or mq.save_checkpoint) to a target's artifacts."""
    qmodel, record = restore_checkpoint(checkpoint, model_ref)
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
@click.option("--model", "model_ref", help="Float model factory 'pkg.module:factory' (default: recorded one).")
@click.option("--inputs", "inputs_file", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.pt/.npy tensor). Default: 4 seeded random samples of the recorded input shape.")
@click.option("--runtime", "runtimes", multiple=True, help="Runtime to use (repeatable; default: the backend's).")
@click.option("--tolerance", type=float, help="Allowed difference in steps (default: each runtime's, else 1).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify_command(export_dir: str, checkpoint: str, model_ref: str | None, inputs_file: str | None,
                   runtimes: tuple[str, ...], tolerance: float | None, as_json: bool) -> None:
    """Run an export folder's artifacts in real runtimes and compare with the simulation, per output.

    Exits with status 1 when any output differs by more than the tolerance.
    """
    qmodel, record = restore_checkpoint(checkpoint, model_ref)
    if inputs_file:
        loaded = load_tensor_file(inputs_file, what="inputs")
        inputs = (loaded.float(),) if isinstance(loaded, torch.Tensor) else tuple(t.float() for t in loaded)
    else:
        specs = [{**s, "shape": [4, *s["shape"][1:]]} for s in record["inputs"]]
        inputs = inputs_from_specs(specs, seed=1)
    report = verify(ExportResult.load(export_dir), inputs, runtimes=list(runtimes) or None, tolerance=tolerance,
                    qmodel=qmodel)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(report.table())
        click.echo(f"{'PASS' if report.passed else 'FAIL'}: worst {report.worst_steps:.3g} steps")
    if not report.passed:
        raise SystemExit(1)


@click.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_ref", help="Float model factory 'pkg.module:factory' (default: recorded one).")
def inspect_command(checkpoint: str, model_ref: str | None) -> None:
    """Show a saved prepared model's quantizers: what each quantizes and why, grid, observer, qparams."""
    qmodel, _ = restore_checkpoint(checkpoint, model_ref)
    click.echo(summary(qmodel))


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
