"""The ranges table: per ONNX tensor, the grid and qparams it is quantized with.

It is the common currency of every exporter: built from the deploy view while exporting the canonical QDQ ONNX,
written into manifests, turned into encodings / dynamic ranges / scale tables by the backend plugins, and used
to put Q/DQ back into a float ONNX (``apply_table``) when a ranges-file artifact is verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from mq_core.export.onnx_graph import Graph, QDQPair, make_node
from mq_core.quant.scheme import QuantScheme

_STORAGE = {(8, True): np.int8, (8, False): np.uint8}


@dataclass
class TensorQuant:
    """How one tensor is quantized: q = clamp(round(x / scale) + zero_point, qmin, qmax)."""

    name: str
    kind: str  # "activation" | "weight"
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None
    quantizer: str = ""

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def storage(self) -> type[np.integer]:
        return _STORAGE[8, self.signed]

    @property
    def min(self) -> np.ndarray:
        """Smallest representable value, (qmin - z) * s."""
        return ((self.qmin - self.zero_point.astype(np.float64)) * self.scale).astype(np.float32)

    @property
    def max(self) -> np.ndarray:
        return ((self.qmax - self.zero_point.astype(np.float64)) * self.scale).astype(np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Integer codes of ``x`` exactly as ONNX QuantizeLinear computes them (float32 division, half-even)."""
        s, z = self.scale.astype(np.float32), self.zero_point.astype(np.float32)
        if self.axis is not None:
            shape = [1] * x.ndim
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return np.clip(np.round(x.astype(np.float32) / s) + z, self.qmin, self.qmax).astype(self.storage)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s, z = self.scale.astype(np.float32), self.zero_point.astype(np.float32)
        if self.axis is not None:
            shape = [1] * q.ndim
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.name, "kind": self.kind, "quantizer": self.quantizer,
            "bits": self.bits, "signed": self.signed, "symmetric": self.symmetric,
            "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis,
            "scale": self.scale.astype(float).tolist(), "zero_point": self.zero_point.astype(int).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorQuant:
        return cls(
            name=data["tensor"], kind=data["kind"], quantizer=data.get("quantizer", ""),
            bits=data["bits"], signed=data["signed"], symmetric=data["symmetric"],
            qmin=data["qmin"], qmax=data["qmax"], axis=data["axis"],
            scale=np.asarray(data["scale"], dtype=np.float32),
            zero_point=np.asarray(data["zero_point"], dtype=np.int64),
        )


QuantTable = dict[str, TensorQuant]


def strip_qdq(model: onnx.ModelProto, table: QuantTable) -> tuple[onnx.ModelProto, QuantTable]:
    """A float ONNX from a QDQ ONNX: activation Q/DQ (and grid Clips) removed, weight DQ folded into float
    initializers holding the dequantized values (which quantize back to the same codes).

    Returns the float model and the table re-keyed by the float model's tensor names (a quantized graph output
    keeps its output name, so the encoding follows it).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    out_table: QuantTable = {}
    pairs: list[QDQPair] = graph.qdq_pairs()
    for pair in pairs:
        if pair.quantize is None:  # weight: int codes + DequantizeLinear -> float initializer
            entry = table[pair.input]
            graph.set_initializer(pair.input, entry.dequantize(graph.array(pair.input)))
            graph.remove_nodes([pair.dequantize])
            graph.rewire(pair.output, pair.input)
            out_table[pair.input] = entry
            continue
        entry = table[pair.input]
        source, output = pair.input, pair.output
        graph.remove_nodes(pair.nodes)
        if output in graph.outputs:
            graph.rename(source, output)
            entry = TensorQuant(**{**entry.__dict__, "name": output})
            out_table[output] = entry
        else:
            graph.rewire(output, source)
            out_table[source] = entry
    graph.remove_unused_initializers()
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model), out_table


def apply_table(model: onnx.ModelProto, table: QuantTable) -> onnx.ModelProto:
    """Put Q/DQ back into a float ONNX from a ranges table (how ranges-file artifacts are verified).

    Activations get QuantizeLinear [-> integer Clip for grids narrower than 8 bits] -> DequantizeLinear after the
    tensor; weights are replaced by their integer codes and a DequantizeLinear.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = Graph(model)
    new_nodes: list[onnx.NodeProto] = []
    for name, entry in sorted(table.items()):
        s_name, z_name = f"{name}_mq_scale", f"{name}_mq_zero_point"
        graph.set_initializer(s_name, entry.scale.astype(np.float32))
        graph.set_initializer(z_name, entry.zero_point.astype(entry.storage))
        axis = {} if entry.axis is None else {"axis": entry.axis}
        if entry.kind == "weight" and name in graph.initializers:
            codes = entry.quantize(graph.array(name))
            graph.set_initializer(f"{name}_mq_codes", codes)
            deq = f"{name}_mq_dequantized"
            graph.rewire(name, deq)
            new_nodes.append(make_node("DequantizeLinear", [f"{name}_mq_codes", s_name, z_name], [deq],
                                       f"{name}_DequantizeLinear", **axis))
            continue
        source, deq = name, f"{name}_mq_dequantized"
        is_output = name in graph.outputs
        if is_output:  # keep the graph output name on the dequantized tensor
            source = f"{name}_mq_float"
            graph.rename(name, source, graph_outputs=False)
        else:
            graph.rewire(name, deq)
        codes = f"{name}_mq_quantized"
        new_nodes.append(make_node("QuantizeLinear", [source, s_name, z_name], [codes], f"{name}_QuantizeLinear",
                                   **axis))
        if (entry.qmin, entry.qmax) != (np.iinfo(entry.storage).min, np.iinfo(entry.storage).max):
            graph.set_initializer(f"{name}_mq_qmin", np.array(entry.qmin, dtype=entry.storage))
            graph.set_initializer(f"{name}_mq_qmax", np.array(entry.qmax, dtype=entry.storage))
            new_nodes.append(make_node("Clip", [codes, f"{name}_mq_qmin", f"{name}_mq_qmax"], [f"{codes}_clipped"],
                                       f"{name}_Clip"))
            codes = f"{codes}_clipped"
        new_nodes.append(make_node("DequantizeLinear", [codes, s_name, z_name], [name if is_output else deq],
                                   f"{name}_DequantizeLinear", **axis))
    model.graph.node.extend(new_nodes)
    _toposort(model)
    return model


def _toposort(model: onnx.ModelProto) -> None:
    """Order nodes so every input is produced before use (appended Q/DQ nodes move next to their producers)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise ValueError(f"graph has a cycle or a missing input near {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)



def weights_as_device_quantizes(
    model: onnx.ModelProto, weights: QuantTable, scheme: QuantScheme
) -> QuantTable:
    """Weight entries recomputed from the float initializers with a device toolchain's own rule (min/max on
    ``scheme``), for artifacts whose ranges file carries activations only (TensorRT legacy, Tengine).

    ``weights`` gives which initializers are weights and their channel axis (the exported table's entries).
    """
    graph = Graph(model)
    out: QuantTable = {}
    for name, entry in weights.items():
        if entry.kind != "weight" or name not in graph.initializers:
            continue
        values = torch.from_numpy(graph.array(name).astype(np.float32))
        axis = entry.axis if scheme.per_channel else None
        if axis is None:
            lo, hi = values.min(), values.max()
        else:
            flat = values.transpose(0, axis).reshape(values.shape[axis], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        s, z = scheme.qparams(lo, hi)
        out[name] = TensorQuant(
            name=name, kind="weight", quantizer=entry.quantizer, bits=scheme.bits, signed=scheme.signed,
            symmetric=scheme.symmetric, qmin=scheme.qmin, qmax=scheme.qmax, axis=axis,
            scale=s.numpy().astype(np.float32), zero_point=z.numpy().astype(np.int64),
        )
    return out
