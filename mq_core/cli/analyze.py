"""``mq analyze``: the sensitivity analysis (``mq.sensitivity``) of a saved prepared checkpoint.

The model is rebuilt as ``mq export`` rebuilds it (``--model`` / ``--trust-model-ref``), ``--calib`` and ``--eval``
are read as ``mq quantize`` reads them. torch and the pipeline are imported inside the command (``mq --help`` must
not import them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mq_core.cli.export import MODEL_OPTION, TRUST_OPTION, restore_checkpoint
from mq_core.cli.options import is_quiet, verbosity_options
from mq_core.cli.quantize import DEMO_MODEL_REF, eval_function
from mq_core.errors import ConfigError

if TYPE_CHECKING:
    from mq_core.pipeline.sensitivity import SensitivityReport

#: The file ``--out`` gets: ``SensitivityReport.to_dict()`` as JSON.
SENSITIVITY_FILE = "sensitivity.json"


def _demo_data() -> tuple[list[Any], Any]:
    """The built-in demo's calibration batches and accuracy function, for a checkpoint of the demo model."""
    from mq_core.demo import digits

    data = digits.load_digits()
    return data.calibration_batches(), lambda m: digits.accuracy(m, data.x_test, data.y_test)


def _as_json(report: SensitivityReport) -> str:
    """The report as strict JSON: an infinite SQNR (an exact tensor) is the string ``"inf"``, as in report.json."""
    from mq_core.report.data import jsonable

    return json.dumps(jsonable(report.to_dict()), indent=2, allow_nan=False)


def finish(report: SensitivityReport, out: str | None, checkpoint: dict[str, Any]) -> None:
    """The one place a finished analysis is written: ``<out>/sensitivity.json``, and the run's ``report.json`` and
    ``report.html`` (``mq_core.report``), each atomically. ``checkpoint`` is the loaded checkpoint the model came
    from (``model_ref``, ``info["backend"]``), for files that name them."""
    if out is None:
        return
    from mq_core.io import atomic_write_text
    from mq_core.report import write_report

    atomic_write_text(Path(out) / SENSITIVITY_FILE, _as_json(report) + "\n")
    write_report(out, sensitivity=report, model=checkpoint.get("model_ref"), backend=checkpoint["info"]["backend"])


@click.command("analyze")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@MODEL_OPTION
@TRUST_OPTION
@click.option("--calib", help="Data to analyse with, as for `mq quantize`: a .pt/.npy tensor [N, ...], a folder of "
                              "images, or 'pkg.module:loader_factory'. Default for the built-in demo's checkpoint: "
                              "the demo's calibration data (and its accuracy as --eval).")
@click.option("--eval", "eval_ref",
              help="Accuracy function 'pkg.module:fn'; fn(model) -> float, higher is better. Without it the metric "
                   "is the SQNR of the model's outputs against float on --calib.")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Measure each quantizer end to end: the metric with only it quantized, and with all but it "
                   "(two runs over --calib, or two --eval calls, per quantizer). --no-sweep: statistics only, ranked "
                   "by each tensor's SQNR.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Batch size for tensor/image data.")
@click.option("--num-batches", type=click.IntRange(min=1),
              help="Use at most this many batches (they are held in memory; each run goes over all of them).")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Side of images read from a --calib folder.")
@click.option("--bins", default=64, show_default=True, type=click.IntRange(min=1), help="Histogram bins.")
@click.option("--top", type=click.IntRange(min=1), help="Print only the N most sensitive quantizers.")
@click.option("--out", type=click.Path(file_okay=False),
              help=f"Write {SENSITIVITY_FILE}, report.json and report.html into this folder.")
@click.option("--json", "json_output", is_flag=True, help="Print the report as JSON.")
@verbosity_options()
@click.pass_context
def analyze_command(ctx: click.Context, checkpoint: str, model_ref: str | None, trust: bool, calib: str | None,
                    eval_ref: str | None, sweep: bool, batch_size: int, num_batches: int | None, image_size: int,
                    bins: int, top: int | None, out: str | None, json_output: bool) -> None:
    """Rank a saved prepared checkpoint's quantizers by how much each one hurts.

    Per fake quantizer: its tensor's SQNR against float, the observed range, the clip range of its qparams, the
    fraction of values clipped and a histogram; with the sweep, the metric with only it quantized and with all but
    it quantized. Most sensitive first.
    """
    from mq_core.cli.loading import calibration_batches
    from mq_core.io import check_writable
    from mq_core.pipeline.sensitivity import sensitivity

    if out is not None:
        check_writable(out)
    qmodel, record = restore_checkpoint(checkpoint, model_ref, trust)
    eval_fn = eval_function(eval_ref)
    data: Any
    if calib is not None:
        data = calibration_batches(calib, batch_size, image_size, num_batches=num_batches)
    elif (model_ref or record.get("model_ref")) == DEMO_MODEL_REF:
        data, demo_eval = _demo_data()
        eval_fn = eval_fn or demo_eval
    else:
        raise ConfigError("missing data to analyse with: pass --calib (a .pt/.npy tensor file, a folder of images, "
                          "or 'pkg.module:loader_factory'), e.g. the calibration data the checkpoint was made with.")
    progress = not (is_quiet(ctx) or json_output)
    report = sensitivity(qmodel, data, eval_fn=eval_fn, sweep=sweep, max_batches=num_batches, bins=bins,
                         batch_size=batch_size, progress=progress)
    finish(report, out, record)
    click.echo(_as_json(report) if json_output else report.table(top))
