"""The report of a run: ``report.json`` (the data) and ``report.html`` (one self-contained page with figures).

``mq quantize``, ``mq.quantize(..., out=...)`` and ``mq analyze`` call ``write_report``. The page is rendered from
the JSON dict alone, so what the page shows is exactly what the file holds.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mq_core.io import atomic_write_text
from mq_core.report.data import Part, report_data
from mq_core.report.html import GENERATOR, render_html

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def _written_by_mq(path: Path) -> bool:
    """Whether ``path`` is absent or a report file mq wrote (report.json with ``mq_version``, a page with mq's
    generator tag): those are the only files a new report replaces."""
    if not path.exists():
        return True
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return "mq_version" in json.loads(text)
    except (OSError, ValueError, TypeError):
        return False
    return GENERATOR in text


def write_report(out_dir: str | os.PathLike[str], *, summary: Part = None, sensitivity: Part = None,
                 mixed_precision: Part = None, model: str | None = None, backend: str | None = None
                 ) -> Path | None:
    """Write ``report.json`` and ``report.html`` into ``out_dir``, each atomically (a reader sees the previous
    file or the new one). The arguments are those of ``mq_core.report.data.report_data``. Returns the page's path
    (report.json is beside it).

    A file of that name that mq did not write (``--out`` pointed at a folder of the user's own) is not replaced:
    the report is then not written, with a warning, and None is returned; the run's other results stand."""
    out = Path(out_dir)
    foreign = [p for p in (out / REPORT_JSON, out / REPORT_HTML) if not _written_by_mq(p)]
    if foreign:
        log.warning("no report written: %s exists and was not written by mq; mq does not replace it. Move it, or "
                    "choose another output folder.", " and ".join(map(str, foreign)))
        return None
    data = report_data(summary=summary, sensitivity=sensitivity, mixed_precision=mixed_precision, model=model,
                       backend=backend)
    atomic_write_text(out / REPORT_JSON, json.dumps(data, indent=1, allow_nan=False) + "\n")
    return atomic_write_text(out / REPORT_HTML, render_html(data))


__all__ = ["REPORT_HTML", "REPORT_JSON", "write_report"]
