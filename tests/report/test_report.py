"""Issue 15, item 3: every ``mq quantize`` run writes ``report.json`` and a self-contained ``report.html``; the page
shows every figure (checked by parsing it, and in a real browser where one is installed) and refers to nothing
outside itself; without matplotlib the report is still written, with one warning."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import mq_core as mq
from mq_core.cli.main import cli
from mq_core.demo import digits
from mq_core.pipeline.workflow import quantize_for_backends
from mq_core.report import REPORT_HTML, REPORT_JSON, write_report
from mq_core.report.data import KEYS
from mq_core.report.html import INSTALL_HINT, SECTIONS

#: The figures of a report with every part (the mixed-precision one needs a mixed-precision result).
FIGURES = {"fig-sqnr", "fig-ranges", "fig-ranking", "fig-verification"}
#: Fill colours of the figures' bars (mq_core/report/figures.py): each appears in the browser's rendering only
#: when its figure was drawn. Per-layer SQNR (weights), range histograms, sensitivity ranking, mixed precision.
BAR_COLOURS = {"sqnr": (0x4C, 0x72, 0xB0), "ranges": (0x8D, 0xA0, 0xCB), "ranking": (0x55, 0xA8, 0x68),
               "mixed": (0x64, 0xB5, 0xCD)}


#: Attributes through which a page loads something (a value starting with # points inside the page).
LOADING = ("src", "href", "xlink:href", "srcset", "action", "data", "poster")


class Page(HTMLParser):
    """What the tests look at in a page: section ids, the ids of figures holding an <svg>, every attribute or
    style that could load something, and the raw <svg> elements."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.figures: list[str] = []
        self.loads: list[str] = []
        self.tags: set[str] = set()
        self._figure: str | None = None
        self.feed(text)
        self.svgs = [text[start: text.index("</svg>", start) + len("</svg>")]
                     for start in _find_all(text, "<svg")]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "section":
            self.sections.append(str(values.get("id")))
        if tag == "figure":
            self._figure = values.get("id")
        if tag == "svg" and self._figure is not None:
            self.figures.append(self._figure)
            self._figure = None
        for name, value in attrs:
            if name in LOADING and value and not value.startswith("#"):
                self.loads.append(f"{tag} {name}={value}")
            if name == "style" and value and "url(" in value and "url(#" not in value:
                self.loads.append(f"{tag} style={value}")


def _find_all(text: str, needle: str) -> list[int]:
    found, start = [], text.find(needle)
    while start != -1:
        found.append(start)
        start = text.find(needle, start + 1)
    return found


@pytest.fixture(scope="module")
def mixed() -> Any:
    """A real mixed-precision result: the digits CNN for qdq from W4A8, within 3 dB of the all-8-bit output SQNR."""
    data = digits.load_digits()
    return mq.search_mixed_precision(digits.pretrained("cnn"), "qdq", (data.x_test[:4],), data.calibration_batches(2),
                                     accuracy_budget=3.0, qconfig="w4a8", sqnr_batches=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`mq quantize` on the built-in digits demo, as a user runs it (two calibration batches)."""
    out = tmp_path_factory.mktemp("report") / "out"
    result = CliRunner().invoke(cli, ["quantize", "--out", str(out), "--num-batches", "2", "-q"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def data(run: tuple[Path, str]) -> dict[str, Any]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}, which is not JSON")

    return json.loads((run[0] / REPORT_JSON).read_text(), parse_constant=refuse)


def test_quantize_writes_the_report_with_every_part(run: tuple[Path, str], data: dict[str, Any]) -> None:
    out, printed = run
    assert f"report: {out / REPORT_HTML}" in printed
    assert tuple(data) == KEYS and data["backend"] == "qdq" and data["model"] == "mq_core.demo.digits:DigitsCNN"
    summary = data["summary"]
    assert summary["passed"] is True and summary["float_accuracy"] > 90
    backend = summary["backends"][0]
    assert backend["simulated_accuracy"] > 90 and backend["artifacts"]["qdq"][0].endswith("model.onnx")
    # the layer-wise report sits once, under "verification", one per export, every local check run
    assert all("layers" not in report for report in backend["verification"].values())
    layers = data["verification"]["layers"]
    assert [layer["exporter"] for layer in layers] == ["qdq"] and data["verification"]["passed"] is True
    assert {c["runtime"] for c in layers[0]["checks"]} >= {"onnxruntime"}
    assert all(c["local_passed"] for c in layers[0]["checks"])
    # the sensitivity of every quantizer of the exported model, from mq.sensitivity, by output SQNR
    sensitivity = data["sensitivity"]
    checkpoint = torch.load(out / "qdq" / "qmodel.pt", weights_only=True)
    enabled = {k.removesuffix(".quant_enabled") for k, v in checkpoint["state_dict"].items()
               if k.endswith(".quant_enabled") and v.item()}
    assert sensitivity["metric"] == "sqnr_db" and set(sensitivity["ranking"]) == enabled
    assert all(len(q["hist_edges"]) == len(q["hist_counts"]) + 1 for q in sensitivity["quantizers"])
    assert data["mixed_precision"] is None


def test_page_has_every_section_and_figure_and_loads_nothing(run: tuple[Path, str]) -> None:
    page = Page((run[0] / REPORT_HTML).read_text())
    assert page.sections == [sid for sid, _ in SECTIONS]
    assert set(page.figures) == FIGURES and len(page.svgs) == len(FIGURES)
    for svg in page.svgs:
        ET.fromstring(svg)  # each figure is well-formed SVG
    assert page.loads == [] and not page.tags & {"script", "link", "img", "iframe", "object", "embed"}
    text = (run[0] / REPORT_HTML).read_text()
    assert "No mixed-precision search in this run" in text and INSTALL_HINT not in text
    assert "@import" not in text and "@font-face" not in text


def test_mixed_precision_part_without_a_quantize_run(tmp_path: Path, data: dict[str, Any], mixed: Any) -> None:
    """A report without a quantize run (as `mq analyze` writes), with a mixed-precision result: its figure, the
    assignment of every layer and the size it reaches."""
    html_path = write_report(tmp_path, sensitivity=data["sensitivity"], mixed_precision=mixed, model="qmodel.pt",
                             backend="qdq")
    assert html_path == tmp_path / REPORT_HTML
    written = json.loads((tmp_path / REPORT_JSON).read_text())
    assert written["summary"] is None and written["verification"] is None
    assert written["mixed_precision"] == json.loads(json.dumps(mixed.to_dict()))
    text = html_path.read_text()
    page = Page(text)
    assert set(page.figures) == {"fig-sqnr", "fig-ranges", "fig-ranking", "fig-mixed"} and page.loads == []
    assert "No quantize run in this report" in text and "No layer-wise verification" in text
    assert all(f"<tr><td>{layer}</td><td>{choice}</td></tr>" in text for layer, choice in mixed.assignment.items())
    assert f"({100 * mixed.size_bytes / mixed.size_all8_bytes:.0f}% of all 8-bit)" in text
    raised = sum(step["from"] == "w4a8" and step["to"] == "w8a8" for step in mixed.steps)
    assert text.count("<td>w4a8</td><td>w8a8</td>") == raised


def test_analyze_writes_the_report(run: tuple[Path, str], tmp_path: Path) -> None:
    """`mq analyze CHECKPOINT --out DIR`: the sensitivity parts, no summary (nothing was quantized)."""
    out = tmp_path / "analysis"
    result = CliRunner().invoke(cli, ["analyze", str(run[0] / "qdq" / "qmodel.pt"), "--no-sweep", "--num-batches", "1",
                                      "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / REPORT_JSON).read_text())
    assert data["backend"] == "qdq" and data["model"] == "mq_core.demo.digits:DigitsCNN" and data["summary"] is None
    assert data["sensitivity"]["ranking"] and data["verification"] is None
    page = Page((out / REPORT_HTML).read_text())
    assert {"fig-sqnr", "fig-ranges"} <= set(page.figures) and page.loads == []


def test_report_flag_and_a_failed_backend(tmp_path: Path) -> None:
    """report=False (`--no-report`) writes nothing; a run whose backend failed still gets a report saying so."""
    calib = [torch.zeros(2, 1, 8, 8)]
    model = digits.DigitsCNN()
    summary = quantize_for_backends(model, ["no-such-backend"], calib, tmp_path / "off", keep_going=True,
                                    progress=False, report=False)
    assert summary.report is None and not (tmp_path / "off" / REPORT_JSON).exists()
    summary = quantize_for_backends(model, ["no-such-backend"], calib, tmp_path / "on", keep_going=True,
                                    progress=False)
    assert summary.report == tmp_path / "on" / REPORT_HTML and summary.report.is_file()
    data = json.loads((tmp_path / "on" / REPORT_JSON).read_text())
    assert data["summary"]["backends"][0]["error"] and data["sensitivity"] is None
    text = summary.report.read_text()
    assert "no-such-backend" in text and "No sensitivity analysis in this run" in text


def test_names_are_text_never_markup(tmp_path: Path, data: dict[str, Any]) -> None:
    """A layer name with TeX and HTML in it is shown as written, in the tables and in the figures."""
    sensitivity = json.loads(json.dumps(data["sensitivity"]))
    for q in sensitivity["quantizers"]:
        q["layer"] = "a$b_{x}$<i>"
    text = write_report(tmp_path, sensitivity=sensitivity).read_text()
    assert "<i>" not in text.replace("<i>Locally</i>", "") and "a$b_{x}$&lt;i&gt;" in text
    page = Page(text)
    assert set(page.figures) == {"fig-sqnr", "fig-ranges", "fig-ranking"}
    assert all("a$b_{x}$&lt;i&gt;" in svg for svg in page.svgs)


def test_files_of_the_user_are_not_replaced(tmp_path: Path, data: dict[str, Any],
                                            caplog: pytest.LogCaptureFixture) -> None:
    """`--out` pointed at a folder of the user's own that holds a report.html mq did not write: the run's report is
    not written over it (with a warning); mq's own report of an earlier run is replaced."""
    assert write_report(tmp_path, sensitivity=data["sensitivity"]) == tmp_path / REPORT_HTML
    assert write_report(tmp_path, sensitivity=None) == tmp_path / REPORT_HTML  # mq's own: replaced
    assert json.loads((tmp_path / REPORT_JSON).read_text())["sensitivity"] is None
    (tmp_path / REPORT_HTML).write_text("<html>my own page</html>")
    with caplog.at_level(logging.WARNING, logger="mq_core.report"):
        assert write_report(tmp_path, sensitivity=data["sensitivity"]) is None
    assert (tmp_path / REPORT_HTML).read_text() == "<html>my own page</html>" and "was not written by mq" in caplog.text
    assert json.loads((tmp_path / REPORT_JSON).read_text())["sensitivity"] is None


def test_without_matplotlib_the_report_is_written_without_plots(tmp_path: Path, data: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with caplog.at_level(logging.WARNING, logger="mq_core.report"):
        html_path = write_report(tmp_path, sensitivity=data["sensitivity"], model="m")
    assert json.loads((tmp_path / REPORT_JSON).read_text())["sensitivity"] == data["sensitivity"]
    text = html_path.read_text()
    assert "<svg" not in text and INSTALL_HINT.replace('"', "&quot;") in text
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "mq-core[report]" in caplog.text
    assert Page(text).sections == [sid for sid, _ in SECTIONS]


def _browser() -> str | None:
    return next((found for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium installed (Debian: apt-get install "
                                               "chromium-headless-shell); the figures are checked by parsing instead")
def test_figures_render_in_a_browser(tmp_path: Path, data: dict[str, Any], mixed: Any) -> None:
    """Headless Chromium renders the page offline; each figure's bar colour appears in the screenshot (a figure
    that failed to render would leave only the tables)."""
    from PIL import Image

    html_path = write_report(tmp_path, sensitivity=data["sensitivity"], mixed_precision=mixed)
    assert html_path is not None
    shot = tmp_path / "page.png"
    browser = _browser()
    assert browser is not None
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,6000", f"--screenshot={shot}", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20) or []
    present = {rgb: count for count, rgb in colours}
    missing = [name for name, rgb in BAR_COLOURS.items() if present.get(rgb, 0) < 50]
    assert missing == [], f"figures not rendered: {missing}"
