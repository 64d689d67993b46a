"""The ``mq`` command. Plugins add sub-commands through the ``register_commands`` hook.

Every ``MQError`` becomes a one-paragraph message on stderr and exit code 2: users see what is wrong and what to
do, never a traceback from deep inside torch.

Importing this module imports neither torch nor the plugins, so ``mq --help`` and shell completion answer at once:
commands import what they need when they run, and plugins (whose commands ``mq --help`` therefore does not list;
``mq plugins`` does) load when a command runs.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from mq_core._version import __version__
from mq_core.cli.analyze import analyze_command
from mq_core.cli.export import export_command, exporters_command, inspect_command, verify_command
from mq_core.cli.options import LOG_FORMAT, apply_verbosity, verbosity_options
from mq_core.cli.quantize import quantize_command
from mq_core.errors import MQError
from mq_core.text import render_table

PLUGIN_COMMANDS_NOTE = ("Plugins can add commands: `mq plugins` lists what each installed plugin registered, "
                        "commands included, and `mq NAME --help` describes one.")


class MQGroup(click.Group):
    """Root group: loads plugin sub-commands when a command is looked up, and reports MQError without a traceback.

    Plugins only add commands: one that would replace or remove a core command is refused by the plugin manager
    (``PluginManager.add_commands``), so ``mq verify`` is always mq's own. Listing the commands (``mq --help``,
    completing a command name) does not load plugins, which would import torch: it shows the core's commands and
    the plugins' once they are loaded.
    """

    _plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if not self._plugin_commands_loaded:
            self._plugin_commands_loaded = True
            from mq_core.plugins.manager import get_manager

            get_manager().add_commands(self)

    _listing = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # Listing the commands (--help) or completing a core command's options needs no plugin.
        if not ((self._listing or ctx.resilient_parsing) and cmd_name in self.commands):
            self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MQError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=MQGroup, epilog=PLUGIN_COMMANDS_NOTE)
@click.version_option(__version__, "--version", prog_name="mq")
@verbosity_options()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """mq: quantize PyTorch models for real targets, export, and verify on real runtimes.

    -v/--verbose and -q/--quiet work before or after the command: `mq -q quantize` is `mq quantize -q`.
    """
    logging.basicConfig(format=LOG_FORMAT)
    apply_verbosity(ctx)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@verbosity_options()
def plugins(as_json: bool) -> None:
    """Installed plugin distributions, their status and what each registered."""
    from mq_core.plugins.manager import get_manager

    manager = get_manager()
    records = [
        {
            "distribution": r.distribution,
            "version": r.version,
            "entry_point": r.entry_point,
            "status": r.status,
            "error": r.error,
            "registered": {k: sorted(v) for k, v in sorted(r.registered.items())},
        }
        for r in manager.records
    ]
    conflicts = [
        {"kind": kind, "name": key, "distributions": [e.distribution for e in claims]}
        for kind, registry in manager.registries.items()
        for key, claims in sorted(registry.conflicts().items())
    ]
    if as_json:
        _emit_json({"plugins": records, "conflicts": conflicts})
        return
    rows = []
    for r in records:
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["registered"].items())
        rows.append([r["distribution"], r["version"], r["status"], r["error"] or what])
    click.echo(render_table(["distribution", "version", "status", "registered (or error)"], rows))
    for c in conflicts:
        click.echo(
            f"conflict: {c['kind'].replace('_', ' ')} {c['name']!r} claimed by {' and '.join(c['distributions'])}; "
            "set MQ_PREFER=<distribution> to choose",
            err=True,
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@verbosity_options()
def backends(as_json: bool) -> None:
    """Installed deployment targets: name, aliases, weight and activation schemes, providing package."""
    from mq_core.plugins.manager import get_manager

    registry = get_manager().registries["backend"]
    items = []
    for entry in sorted(registry.entries(), key=lambda e: e.name):
        items.append({**entry.obj.summary(), "provided_by": entry.distribution, "version": entry.version})
    if as_json:
        _emit_json(items)
        return
    rows = [
        [b["name"], ", ".join(b["aliases"]), b["weight"], b["activation"], b["placement"].split(";")[0],
         f"{b['provided_by']} {b['version']}"]
        for b in items
    ]
    click.echo(render_table(["backend", "aliases", "weights", "activations", "placement", "package"], rows))


cli.add_command(export_command)
cli.add_command(verify_command)
cli.add_command(inspect_command)
cli.add_command(exporters_command)
cli.add_command(quantize_command)
cli.add_command(analyze_command)


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="mq", standalone_mode=True))
