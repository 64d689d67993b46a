"""QAT embedding: an ``nn.Embedding`` whose table is fake-quantized, one grid per row (the table's axis 0).

Only backends whose runtime reads a quantized table swap it in (``PlacementPolicy.weight_kinds`` lists
"embedding": ONNX Runtime dequantizes the int8 table, then gathers from it, so the artifact's table is 4x smaller
and the lookup gives exactly the simulated values). Elsewhere the table stays float.

A row is one token's vector, so a per-channel grid over axis 0 gives each token its own scale (a per-tensor grid
over a vocabulary of 30k rows would be set by its few largest rows). ``max_norm`` renormalises the looked-up rows
of the table in place at every call, which no frozen integer table can do: such a layer stays float
(``keeps_float``). The QAT forward computes dense gradients (``sparse`` is not kept): the fake quantizer between
the table and the lookup has no sparse backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mq_core.nn.qat import QATModule
from mq_core.quant.fake_quant import FakeQuantizer


class QEmbedding(QATModule, nn.Embedding):
    """Embedding with a fake-quantized table (per-channel axis 0: one grid per row)."""

    #: No bias (as ``nn.Embedding``); read where QAT layers are handled alike (deploy weight and bias, bias correction).
    bias = None

    @classmethod
    def keeps_float(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot take a quantized table (None when it can): read by the QAT swap, which then keeps
        the layer float and says so."""
        if getattr(module, "max_norm", None) is not None:
            return ("it has max_norm, which renormalises the table rows in place at every lookup; a frozen integer "
                    "table cannot follow it")
        return None

    @classmethod
    def from_float(cls, mod: nn.Module, weight_fake_quant: FakeQuantizer) -> QEmbedding:
        """Build from an ``nn.Embedding``: the table is copied (requires_grad, device, dtype kept)."""
        if not isinstance(mod, nn.Embedding) or cls.keeps_float(mod) is not None:
            raise TypeError(f"{cls.__name__}.from_float cannot convert a {type(mod).__name__} "
                            f"({cls.keeps_float(mod) or 'not an nn.Embedding'}).")
        weight = mod.weight
        qat = cls(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx,
                  scale_grad_by_freq=mod.scale_grad_by_freq, device="meta", dtype=weight.dtype,
                  weight_fake_quant=weight_fake_quant.to(weight.device))
        qat.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        return qat.train(mod.training)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.embedding(x, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)

    def to_float(self) -> nn.Module:
        """The plain ``nn.Embedding`` with the unquantized table (deploy code quantizes it)."""
        layer = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                             scale_grad_by_freq=self.scale_grad_by_freq, device="meta", dtype=self.weight.dtype)
        layer.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.weight.requires_grad)
        return layer.train(self.training)
