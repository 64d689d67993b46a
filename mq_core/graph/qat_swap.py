"""QAT swap, the step between fusion and placement: each layer with a registered QAT type is replaced by that type,
carrying a weight fake quantizer.

The mapping (float layer type -> QAT type) and the quantizer factory come from the caller (``pipeline/prepare``,
which looks them up in the registries), so this graph step never resolves names itself. The backend's placement
policy names the op kinds whose weights are quantized (``PlacementPolicy.weight_kinds``: embedding tables only where
the runtime reads them quantized).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from torch import fx, nn

from mq_core.graph.ops import module_kind
from mq_core.graph.placement import Skip
from mq_core.graph.policy import WEIGHT_KINDS
from mq_core.nn.qat import QATModule
from mq_core.quant.fake_quant import FakeQuantizer

log = logging.getLogger(__name__)


def swap_qat_modules(
    gm: fx.GraphModule,
    mapping: Mapping[type[nn.Module], type[QATModule]],
    build_weight_quantizer: Callable[[int, fx.Node], FakeQuantizer],
    skip: Skip,
    weight_kinds: frozenset[str] = WEIGHT_KINDS,
) -> list[str]:
    """Swap every called layer of a mapped type (and not skipped) for its QAT type, in place; returns their names.

    ``build_weight_quantizer(ch_axis, node)`` makes a fresh weight quantizer for the layer ``node`` calls (per-layer
    qconfigs give layers different grids); ``ch_axis`` is the QAT type's weight channel axis (1 for transposed
    convolutions), used by per-channel grids. Layers whose op kind is not in ``weight_kinds`` keep their float
    weight; a QAT type may refuse a layer with a reason (``keeps_float(module)``, e.g. an embedding with max_norm),
    which is logged as a warning and the layer stays float.
    """
    modules = dict(gm.named_modules())
    swapped = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or skip(node, modules):
            continue
        target = str(node.target)
        qat_type = mapping.get(type(modules[target]))
        if qat_type is None or module_kind(modules[target]) not in weight_kinds:
            continue
        reason = getattr(qat_type, "keeps_float", lambda _module: None)(modules[target])
        if reason is not None:
            log.warning("%s (%s) keeps a float weight: %s. To silence this, skip it (skip=[%r]).", target,
                        type(modules[target]).__name__, reason, target)
            continue
        fq = build_weight_quantizer(qat_type.weight_ch_axis, node)
        fq.qname = f"{target}.weight_fake_quant"
        fq.role = "weight"
        fq.layer = target
        qat = qat_type.from_float(modules[target], fq)
        parent_name, _, child = target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, qat)
        modules[target] = qat
        swapped.append(target)
    gm.recompile()
    return swapped
