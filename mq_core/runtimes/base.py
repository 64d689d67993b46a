"""Runtime: a real executor that runs an exported ONNX model, used to verify artifacts against the simulation."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import numpy as np
import onnx


class Runtime:
    """Base class. Subclasses set ``name``, ``module`` (the import that must be present), ``install`` (the pip
    command that provides it) and the ONNX ``domains`` they execute, and implement ``run``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    module: ClassVar[str]
    install: ClassVar[str]
    domains: ClassVar[frozenset[str]] = frozenset({"", "ai.onnx"})
    #: Allowed difference in steps when ``verify`` is not given one (None: the default, 1 step). A runtime that
    #: declares a larger one says why in its docstring.
    tolerance: ClassVar[float | None] = None
    #: Whether the runtime rounds exact .5 ties to even, as QuantizeLinear and mq's simulation do. One that does not
    #: (OpenVINO's FakeQuantize) says so, and the layer-wise verification then does not count a one-step
    #: difference at an exact tie of the simulation against it (``mq_core.pipeline.verify_layers``).
    ties_to_even: ClassVar[bool] = True

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def can_run(self, model: onnx.ModelProto) -> bool:
        """Whether every node's domain is one this runtime executes."""
        return all(node.domain in self.domains for node in model.graph.node)

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs on ``feeds``. mq calls it in a worker process (``mq_core.runtimes.isolation``), so
        that a crash in native code fails a check instead of ending mq: the object travels there by pickle, and
        the process imports the runtime's module without mq_core's package ``__init__`` files, hence without torch
        unless the module imports it (import heavy libraries inside ``run``)."""
        raise NotImplementedError

    def notes(self, model: onnx.ModelProto) -> list[str]:
        """What a reader of a verification report should know about this run (e.g. hardware caveats)."""
        return []

    def __repr__(self) -> str:
        return f"<runtime {self.name}>"
