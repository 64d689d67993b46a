"""BRECQ (Li et al. 2021): block-wise learned rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from mq_algos.ptq.reconstruction import ReconstructionConfig, reconstruct
from mq_core.plugin_api import PTQMethod


@dataclass(frozen=True)
class BRECQConfig(ReconstructionConfig):
    """BRECQ's options (see ``ReconstructionConfig``).

    Attributes:
        learn_activation_scale: on, as in the paper's low-bit activation experiments (LSQ, lr 4e-5).
        blocks: module-name prefixes forced into one unit each, e.g. ``("layer1", "layer2")`` for stage-wise
            reconstruction; other layers are grouped automatically (residual blocks, single layers).
    """

    learn_activation_scale: bool = True
    blocks: tuple[str, ...] = ()


class BRECQ(PTQMethod):
    """Rounding learned per block (a residual block, or a single layer outside any block) so that the block's
    output matches the float block's; the interactions between a block's layers are optimised jointly."""

    name: ClassVar[str] = "brecq"
    description: ClassVar[str] = "BRECQ: block-wise learned weight rounding and activation scales (Li et al. 2021)."
    Config = BRECQConfig

    def apply(self, qmodel: nn.Module, data: list[Any], config: Any, progress: bool) -> None:
        reconstruct(qmodel, data, config, method=self.name, granularity="block", blocks=config.blocks,
                    progress=progress)
