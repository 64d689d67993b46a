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

from dataclasses import dataclass
from typing import Any

from mq_core.plugin_api import ExportContext, QConfig, RangesFile, RangesFileExporter, TensorQuant, check_choice
from mq_snpe.encodings import FORMATS, LEGACY, V1, quantizer_args, read_encodings, to_aimet

#: AIMET's name for how ranges were calibrated (``quantizer_args.quant_scheme``); other observers map to
#: ``post_training_tf_enhanced``, AIMET's name for a searched (not plain min/max) range.
_QUANT_SCHEMES = {"minmax": "post_training_tf", "ema_minmax": "post_training_tf",
                  "percentile": "post_training_percentile"}


def _quant_scheme(qconfig: QConfig | None) -> str:
    if qconfig is None:
        return "post_training_tf"
    return _QUANT_SCHEMES.get(qconfig.activation.observer, "post_training_tf_enhanced")


class SNPEExporter(RangesFileExporter):
    name = "snpe"
    description = "Float ONNX + AIMET encodings 0.6.1 for snpe-onnx-to-dlc --quantization_overrides."
    backends = ("snpe",)
    float_description = "Float ONNX (no Q/DQ, BN folded, dequantized weights) for the SNPE/QNN converter."
    files = (RangesFile("encodings", ".encodings", read_encodings,
                        "AIMET encodings {format}: pass with --quantization_overrides."),)
    uncovered = "have no encoding; the converter will calibrate them itself"

    @dataclass(frozen=True)
    class Options(RangesFileExporter.Options):
        """name: file stem (``model.float.onnx``, ``model.encodings``); format: AIMET encodings version,
        ``"0.6.1"`` (SNPE, the ``snpe`` default) or ``"1.0.0"`` (QNN, the ``qnn`` default)."""

        format: str = LEGACY

        def __post_init__(self) -> None:
            check_choice("format", self.format, FORMATS,
                         " Use 0.6.1 for SNPE's snpe-onnx-to-dlc, 1.0.0 for QNN's qnn-onnx-converter.")

    def write_ranges(self, ctx: ExportContext, entries: list[TensorQuant]) -> dict[str, Any]:
        args = quantizer_args(entries, _quant_scheme(ctx.qconfig))
        return {"encodings": to_aimet(entries, ctx.options.format, args)}


class QNNExporter(SNPEExporter):
    name = "qnn"
    description = "Float ONNX + AIMET encodings 1.0.0 for qnn-onnx-converter --quantization_overrides."

    @dataclass(frozen=True)
    class Options(SNPEExporter.Options):
        """name: file stem (``model.float.onnx``, ``model.encodings``); format: AIMET encodings version,
        ``"1.0.0"`` (QNN, default here) or ``"0.6.1"`` (SNPE)."""

        format: str = V1
