"""QAT swap, the step between fusion and placement: each layer with a registered QAT type is replaced by that type,
carrying a weight fake quantizer.

The mapping (float layer type -> QAT type) and the quantizer factory come from the caller (``pipeline/prepare``,
which looks them up in the registries), so this graph step never resolves names itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import fx, nn

from mq_core.graph.placement import Skip
from mq_core.nn.qat import QATModule
from mq_core.quant.fake_quant import FakeQuantizer


def swap_qat_modules(
    gm: fx.GraphModule,
    mapping: Mapping[type[nn.Module], type[QATModule]],
    build_weight_quantizer: Callable[[int], FakeQuantizer],
    skip: Skip,
) -> list[str]:
    """Swap every called layer of a mapped type (and not skipped) for its QAT type, in place; returns their names.

    ``build_weight_quantizer(ch_axis)`` makes a fresh weight quantizer; ``ch_axis`` is the QAT type's weight channel
    axis (1 for transposed convolutions), used by per-channel grids.
    """
    modules = dict(gm.named_modules())
    swapped = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or skip(node, modules):
            continue
        target = str(node.target)
        qat_type = mapping.get(type(modules[target]))
        if qat_type is None:
            continue
        fq = build_weight_quantizer(qat_type.weight_ch_axis)
        fq.qname = f"{target}.weight_fake_quant"
        fq.role = "weight"
        qat = qat_type.from_float(modules[target], fq)
        parent_name, _, child = target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, qat)
        modules[target] = qat
        swapped.append(target)
    gm.recompile()
    return swapped
