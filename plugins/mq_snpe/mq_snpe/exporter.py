"""The ``snpe`` and ``qnn`` exporters: a float ONNX plus AIMET encodings for ``--quantization_overrides``.

Artifacts (``name`` option ``model``):

* ``model.float.onnx`` (kind ``onnx-float``): Q/DQ removed, BN folded, weights dequantized (they quantize back to
  the same codes with the encodings);
* ``model.encodings`` (kind ``encodings``): AIMET encodings JSON, format ``0.6.1`` (``snpe``) or ``1.0.0``
  (``qnn``), named like AIMET's own exports. ``snpe-onnx-to-dlc --input_network model.float.onnx
  --quantization_overrides model.encodings`` (or ``qnn-onnx-converter``) quantizes with them.

Every quantized activation and weight of the model is written under its float-ONNX tensor name, plus copies
across grid-preserving ops (``propagate_through_passthrough``), because the converters quantize every layer output
and re-calibrate any tensor the file does not name. Verification reads the written file back (not the
exporter's memory) and rebuilds Q/DQ from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from mq_core.errors import ConfigError, ExportError
from mq_core.export.exporter import ExportContext, Exporter, ExportResult, Runnable
from mq_core.export.ranges import in_graph_order, propagate_through_passthrough, rebuild_qdq, uncovered_tensors
from mq_core.pipeline.prepare import prepare_info
from mq_snpe.encodings import FORMATS, LEGACY, V1, encoded_names, quantizer_args, read_encodings, to_aimet

log = logging.getLogger(__name__)

FLOAT_KIND = "onnx-float"
ENCODINGS_KIND = "encodings"

#: AIMET's name for how ranges were calibrated (``quantizer_args.quant_scheme``); other observers map to
#: ``post_training_tf_enhanced``, AIMET's name for a searched (not plain min/max) range.
_QUANT_SCHEMES = {"minmax": "post_training_tf", "ema_minmax": "post_training_tf",
                  "percentile": "post_training_percentile"}


def _quant_scheme(ctx: ExportContext) -> str:
    if ctx.qmodel is None:
        return "post_training_tf"
    observer = prepare_info(ctx.qmodel).qconfig.activation.observer
    return _QUANT_SCHEMES.get(observer, "post_training_tf_enhanced")


class SNPEExporter(Exporter):
    name = "snpe"
    description = "Float ONNX + AIMET encodings 0.6.1 for snpe-onnx-to-dlc --quantization_overrides."
    backends = ("snpe",)

    @dataclass(frozen=True)
    class Options(Exporter.Options):
        """name: file stem (``model.float.onnx``, ``model.encodings``); format: AIMET encodings version,
        ``"0.6.1"`` (SNPE, the ``snpe`` default) or ``"1.0.0"`` (QNN, the ``qnn`` default)."""

        format: str = LEGACY

        def __post_init__(self) -> None:
            if self.format not in FORMATS:
                raise ConfigError(f"unknown AIMET encodings format {self.format!r}: choose one of {list(FORMATS)} "
                                  "(0.6.1 for SNPE's snpe-onnx-to-dlc, 1.0.0 for QNN's qnn-onnx-converter).")

    def export(self, ctx: ExportContext) -> None:
        float_model, table = ctx.float_model()
        table = propagate_through_passthrough(float_model, table)
        entries = in_graph_order(float_model, table)
        document = to_aimet(entries, ctx.options.format, quantizer_args(entries, _quant_scheme(ctx)))
        missing = sorted(set(table) - encoded_names(document))
        if missing:  # a tensor missing from the file would be silently re-calibrated by the converter
            raise ExportError(f"quantized tensors missing from the encodings: {missing[:8]} (this is a bug in mq's "
                              "export: please report it).")
        uncovered = uncovered_tensors(float_model, table)
        if uncovered:
            log.warning("%d float tensor(s) have no encoding; the converter will calibrate them itself: %s",
                        len(uncovered), ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else ""))
        stem, fmt = ctx.options.name, ctx.options.format
        ctx.save_onnx(f"{stem}.float.onnx", float_model, FLOAT_KIND,
                      "Float ONNX (no Q/DQ, BN folded, dequantized weights) for the SNPE/QNN converter.")
        ctx.save_json(f"{stem}.encodings", document, ENCODINGS_KIND,
                      f"AIMET encodings {fmt}: pass with --quantization_overrides.")
        log.info("wrote %d encodings (format %s) for %s", len(entries), fmt, stem)

    def runnables(self, result: ExportResult) -> list[Runnable]:
        float_model = onnx.load(result.path(FLOAT_KIND))
        axes = {name: e.axis for name, e in result.table.items() if e.axis is not None}
        table = read_encodings(result.path(ENCODINGS_KIND), axes)
        return [rebuild_qdq(float_model, table, ENCODINGS_KIND,
                            "float ONNX with Q/DQ rebuilt from the encodings file as written")]


class QNNExporter(SNPEExporter):
    name = "qnn"
    description = "Float ONNX + AIMET encodings 1.0.0 for qnn-onnx-converter --quantization_overrides."

    @dataclass(frozen=True)
    class Options(SNPEExporter.Options):
        """name: file stem (``model.float.onnx``, ``model.encodings``); format: AIMET encodings version,
        ``"1.0.0"`` (QNN, default here) or ``"0.6.1"`` (SNPE)."""

        format: str = V1
