"""AdaRound (Nagel et al. 2020): layer-wise learned rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from mq_algos.ptq.reconstruction import ReconstructionConfig, reconstruct
from mq_core.plugin_api import PTQMethod


@dataclass(frozen=True)
class AdaRoundConfig(ReconstructionConfig):
    """AdaRound's options (see ``ReconstructionConfig``); activations keep their calibrated scales, as in the
    paper."""


class AdaRound(PTQMethod):
    """Each weight layer on its own: learn whether each weight rounds up or down so that the layer's output (on
    the quantized model's inputs) matches the float layer's."""

    name: ClassVar[str] = "adaround"
    description: ClassVar[str] = "AdaRound: layer-wise learned weight rounding (Nagel et al. 2020)."
    Config = AdaRoundConfig

    def apply(self, qmodel: nn.Module, data: list[Any], config: Any, progress: bool) -> None:
        reconstruct(qmodel, data, config, method=self.name, granularity="layer", progress=progress)
