"""Backend: everything the core needs to know about a deployment target, as data.

A plugin registers one ``Backend`` per target through ``register_backends``. The core reads it to pick grids and
observers (``qconfig``), to place activation quantizers (``placement``), to refuse bit widths the target's runtime
cannot run, and to find the exporters and runtimes that produce and check its artifacts. It is data and validation
only: ``mq_core.pipeline.resolve.resolve_qconfig`` applies a preset to its default qconfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mq_core.errors import SchemeError
from mq_core.graph.policy import PlacementPolicy
from mq_core.quant.qconfig import QConfig


@dataclass(frozen=True)
class Backend:
    """A deployment target.

    Attributes:
        name: registry name (``tensorrt``); ``aliases`` are alternative names (``trt``).
        qconfig: the target's default grids and observers for weights and activations.
        placement: where activation quantizers go.
        exporters: names of exporters producing this target's artifacts; the first is the default.
        weight_bits / activation_bits: bit widths the target's runtime executes.
        runtimes: runtimes used by ``verify`` for this target's artifacts, in order of preference.
        notes: one line a user should know when deploying (shown by ``mq backends``).
    """

    name: str
    description: str
    qconfig: QConfig
    placement: PlacementPolicy
    aliases: tuple[str, ...] = ()
    exporters: tuple[str, ...] = ("qdq",)
    weight_bits: frozenset[int] = frozenset({8})
    activation_bits: frozenset[int] = frozenset({8})
    runtimes: tuple[str, ...] = ("onnxruntime",)
    notes: str = ""

    @property
    def default_exporter(self) -> str:
        return self.exporters[0]

    def check(self, qconfig: QConfig) -> None:
        """Refuse bit widths this target cannot execute, with the reason and an alternative."""
        w, a = qconfig.weight.scheme.bits, qconfig.activation.scheme.bits
        if w in self.weight_bits and a in self.activation_bits:
            return
        raise SchemeError(
            f"backend {self.name!r} cannot run W{w}A{a} (qconfig {qconfig.name!r}): its runtime executes weights "
            f"of {_bits(self.weight_bits)} bits and activations of {_bits(self.activation_bits)} bits. Pick a "
            "qconfig with those widths, or use the 'qdq' backend, which simulates and exports 2-8 bit grids for "
            "research."
        )

    def summary(self) -> dict[str, Any]:
        """Plain-data description used by ``mq backends --json`` and the docs."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "description": self.description,
            "weight": self.qconfig.weight.scheme.describe(),
            "weight_observer": self.qconfig.weight.observer,
            "activation": self.qconfig.activation.scheme.describe(),
            "activation_observer": self.qconfig.activation.observer,
            "placement": self.placement.describe(),
            "weight_bits": sorted(self.weight_bits),
            "activation_bits": sorted(self.activation_bits),
            "exporters": list(self.exporters),
            "runtimes": list(self.runtimes),
            "notes": self.notes,
        }


def _bits(values: frozenset[int]) -> str:
    return "/".join(str(v) for v in sorted(values))
