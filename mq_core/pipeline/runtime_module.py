"""``mq.RuntimeModule``: a deployed artifact running in a real runtime, called like the torch model it came from.

Accuracy is measured on what ships: the same accuracy function that scores the float model and the simulation
scores the exported artifact when it is handed a ``RuntimeModule`` (``mq quantize`` does this for its "deployed
acc" column). The runtime runs in its worker process (``mq_core.runtimes.isolation``), so a runtime that crashes
in native code raises ``RuntimeCrashError`` instead of ending the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from mq_core.errors import ConfigError, VerificationError
from mq_core.export.exporter import ExportResult, Runnable
from mq_core.pipeline.runs import feeds, select_runtimes
from mq_core.plugins.lookup import get_backend, get_exporter, get_runtime
from mq_core.runtimes import isolation
from mq_core.runtimes.base import Runtime
from mq_core.text import shorten

if TYPE_CHECKING:
    from mq_core.pipeline.workflow import BackendOutcome, QuantizeSummary


class RuntimeModule(nn.Module):
    """An exported artifact running in a real runtime, callable like the model: ``RuntimeModule(result)(x)``.

    Args:
        source: what to run: the result of ``mq.quantize`` (a ``QuantizeSummary`` of one backend, or one
            ``BackendOutcome`` of it), an ``ExportResult`` (``mq.export``), an export folder (path), or an
            ``onnx.ModelProto`` (then ``runtime`` is required).
        runtime: a runtime name (``"onnxruntime"``, ``"openvino"``, ``"tvm"``, ``"onnxruntime-opt"``; see
            ``mq.list_runtimes()``) or a ``Runtime`` object. Default: the first of the backend's own runtimes that
            is installed and can run the artifact, as ``mq.verify`` picks them.
        exporter: which export of a ``mq.quantize`` result (default: the backend's default exporter).
        artifact: which runnable model of the export, by artifact kind (``"onnx-qdq"``); default the first one the
            runtime can run. For ranges-file exports (SNPE, Tengine, TensorRT legacy) the runnable model is the
            float ONNX with the ranges file's quantization put back, as ``mq.verify`` runs it.

    Inputs are torch tensors (any device; each is converted to the dtype its graph input declares); outputs are
    CPU tensors, one tensor for a single output, else a tuple. The module has no parameters: ``.to()``,
    ``.eval()`` and ``torch.no_grad()`` change nothing. Errors: ``ConfigError`` when the source or the names are
    wrong, ``VerificationError`` when the runtime fails (``RuntimeCrashError`` when its process died).
    """

    def __init__(self, source: QuantizeSummary | BackendOutcome | ExportResult | str | Path | onnx.ModelProto,
                 runtime: str | Runtime | None = None, *, exporter: str | None = None,
                 artifact: str | None = None) -> None:
        super().__init__()
        if isinstance(source, onnx.ModelProto):
            if runtime is None:
                raise ConfigError("RuntimeModule(onnx_model) needs runtime= (e.g. 'onnxruntime'): a bare ONNX model "
                                  "does not say which target's runtimes run it.")
            self.runtime = get_runtime(runtime) if isinstance(runtime, str) else runtime
            self.model, self.artifact = source, artifact or "onnx"
            return
        result = _export_result(source, exporter)
        self.runtime, runnable = _choose(result, runtime, artifact)
        self.model, self.artifact = runnable.model, runnable.artifact
        isolation.start(self.runtime)  # the worker loads while the caller prepares its data

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        given = feeds(self.model, inputs)
        outputs = [torch.from_numpy(o) for o in isolation.run(self.runtime, self.model, given,
                                                              f"the {self.artifact} artifact")]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def extra_repr(self) -> str:
        return f"artifact={self.artifact!r}, runtime={self.runtime.name!r}"


def _export_result(source: Any, exporter: str | None) -> ExportResult:
    """The ``ExportResult`` that ``source`` stands for: the result of ``mq.quantize`` (or one backend's outcome of
    it) says which through its ``export_result``."""
    if hasattr(source, "export_result"):
        return source.export_result(exporter)
    if exporter is not None:
        raise ConfigError("exporter= picks one export of an mq.quantize result; an ExportResult or an export folder "
                          "is one export already.")
    if isinstance(source, (str, Path)):
        return ExportResult.load(source)
    if isinstance(source, ExportResult):
        return source
    raise ConfigError(f"RuntimeModule runs an export: pass the result of mq.quantize or mq.export, an export "
                      f"folder or an onnx.ModelProto, not a {type(source).__name__}.")


def _choose(result: ExportResult, runtime: str | Runtime | None, artifact: str | None) -> tuple[Runtime, Runnable]:
    """The runtime and runnable model: the first pair, in the order asked for, where the runtime is installed and
    can run the model (``Runtime.available``, ``Runtime.can_run``)."""
    runnables = get_exporter(result.exporter).runnables(result)
    if artifact is not None:
        kinds = [r.artifact for r in runnables]
        runnables = [r for r in runnables if r.artifact == artifact]
        if not runnables:
            raise ConfigError(f"the {result.exporter} export has no runnable artifact {artifact!r}; it has "
                              f"{shorten(kinds) or 'none'}.")
    skipped: list[str] = []
    if runtime is None:
        runtimes = select_runtimes(get_backend(result.backend), None, skipped)
    else:
        runtimes = [get_runtime(runtime)]
    for candidate in runtimes:
        if not candidate.available():
            skipped.append(f"{candidate.name} is not installed ({candidate.install})")
            continue
        for runnable in runnables:
            if candidate.can_run(runnable.model):
                return candidate, runnable
        skipped.append(f"{candidate.name} cannot run {shorten([r.artifact for r in runnables])}")
    raise VerificationError(f"no runtime can run the {result.exporter} export of backend {result.backend}: "
                            f"{'; '.join(skipped) or 'the backend lists no runtime'}. Install one, or pass runtime=.")
