"""QConfig: how weights and activations are quantized (grid + observer + fake quantizer), and named presets.

A backend owns a default QConfig (its hardware's grids). A *preset* ("w4a4-lsq", "w8a8-pot") changes bit widths,
the quantizer and the observer while the backend keeps deciding signedness, symmetry and granularity, so any
preset combines with any backend that can run its bit widths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mq_core.quant.scheme import QuantScheme


@dataclass(frozen=True)
class QuantizerSpec:
    """Everything needed to build one fake quantizer: grid, observer name/options, quantizer name/options.

    Data only: ``mq_core.pipeline.resolve.build_quantizer`` finds the named classes and builds the quantizer."""

    scheme: QuantScheme
    observer: str = "minmax"
    fake_quantizer: str = "fixed"
    observer_options: Mapping[str, Any] = field(default_factory=dict)
    fake_quantizer_options: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> QuantizerSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizerSpec:
        return cls(
            scheme=QuantScheme.from_dict(data["scheme"]),
            observer=data["observer"],
            fake_quantizer=data["fake_quantizer"],
            observer_options=dict(data.get("observer_options", {})),
            fake_quantizer_options=dict(data.get("fake_quantizer_options", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.to_dict(),
            "observer": self.observer,
            "fake_quantizer": self.fake_quantizer,
            "observer_options": dict(self.observer_options),
            "fake_quantizer_options": dict(self.fake_quantizer_options),
        }


@dataclass(frozen=True)
class QConfig:
    """Weight and activation quantizer specs, plus the name of the preset that produced them."""

    weight: QuantizerSpec
    activation: QuantizerSpec
    name: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight.to_dict(), "activation": self.activation.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QConfig:
        return cls(QuantizerSpec.from_dict(data["weight"]), QuantizerSpec.from_dict(data["activation"]),
                   name=data.get("name", "default"))


@dataclass(frozen=True)
class QConfigPreset:
    """A named recipe applied on top of a backend's default QConfig.

    ``None`` fields keep the backend's choice. ``weight_scheme``/``activation_scheme`` hold extra QuantScheme
    field overrides (e.g. ``{"pot_scale": True}``).
    """

    name: str
    description: str
    weight_bits: int | None = None
    activation_bits: int | None = None
    weight_fake_quantizer: str | None = None
    activation_fake_quantizer: str | None = None
    weight_observer: str | None = None
    activation_observer: str | None = None
    weight_scheme: Mapping[str, Any] = field(default_factory=dict)
    activation_scheme: Mapping[str, Any] = field(default_factory=dict)
    weight_fake_quantizer_options: Mapping[str, Any] = field(default_factory=dict)
    activation_fake_quantizer_options: Mapping[str, Any] = field(default_factory=dict)
    #: A PTQ method this preset is meant for (shown by ``mq quantize``); informational.
    recommended_method: str | None = None

    def apply(self, base: QConfig) -> QConfig:
        return QConfig(
            weight=_apply(base.weight, self.weight_bits, self.weight_fake_quantizer, self.weight_observer,
                          self.weight_scheme, self.weight_fake_quantizer_options),
            activation=_apply(base.activation, self.activation_bits, self.activation_fake_quantizer,
                              self.activation_observer, self.activation_scheme,
                              self.activation_fake_quantizer_options),
            name=self.name,
        )


def _apply(
    spec: QuantizerSpec,
    bits: int | None,
    fake_quantizer: str | None,
    observer: str | None,
    scheme_changes: Mapping[str, Any],
    fq_options: Mapping[str, Any],
) -> QuantizerSpec:
    changes: dict[str, Any] = dict(scheme_changes)
    if bits is not None:
        changes["bits"] = bits
    scheme = spec.scheme.replace(**changes) if changes else spec.scheme
    return spec.replace(
        scheme=scheme,
        fake_quantizer=fake_quantizer or spec.fake_quantizer,
        observer=observer or spec.observer,
        fake_quantizer_options=dict(fq_options) if fake_quantizer else spec.fake_quantizer_options,
        observer_options={} if observer else spec.observer_options,
    )
