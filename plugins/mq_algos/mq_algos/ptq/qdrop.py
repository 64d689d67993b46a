"""QDrop (Wei et al. 2022): BRECQ with activation quantization dropped at random during reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from mq_algos.ptq.brecq import BRECQConfig
from mq_algos.ptq.reconstruction import reconstruct
from mq_core.plugin_api import ConfigError, PTQMethod


@dataclass(frozen=True)
class QDropConfig(BRECQConfig):
    """QDrop's options: BRECQ's, plus

    Attributes:
        drop_prob: probability that an activation element is quantized during reconstruction (kept in float
            otherwise); paper: 0.5. 1.0 is BRECQ.
    """

    drop_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.drop_prob <= 1:
            raise ConfigError(f"QDropConfig: drop_prob is a probability in (0, 1], got {self.drop_prob}.")


class QDrop(PTQMethod):
    """Block-wise reconstruction in which each activation element inside the block is quantized with probability
    ``drop_prob`` and left in float otherwise, which flattens the loss landscape the rounding is learned on."""

    name: ClassVar[str] = "qdrop"
    description: ClassVar[str] = "QDrop: BRECQ with random activation-quantization drop (Wei et al. 2022)."
    Config = QDropConfig

    def apply(self, qmodel: nn.Module, data: list[Any], config: Any, progress: bool) -> None:
        reconstruct(qmodel, data, config, method=self.name, granularity="block", blocks=config.blocks,
                    drop_prob=config.drop_prob, progress=progress)
