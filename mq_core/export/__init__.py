"""Export: the deploy view, the canonical QDQ ONNX, the ranges table and the exporter interface.

``export()`` itself, which runs an exporter on a prepared model, is a pipeline step: ``mq_core.pipeline.export``.
"""

from __future__ import annotations

from mq_core.export.exporter import Artifact, ExportContext, Exporter, ExportResult, Runnable

__all__ = ["Artifact", "ExportContext", "ExportResult", "Exporter", "Runnable"]
