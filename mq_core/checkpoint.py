"""Checkpoints of prepared models: state dict + how the model was prepared, loadable with weights_only=True.

A checkpoint holds only tensors and plain data (no pickled classes), so ``torch.load(weights_only=True)`` reads
it. To restore, prepare the same float model again with the recorded settings and load the state dict:
``restore(model_factory(), load_checkpoint(path))``. ``model_ref`` (``pkg.module:factory``) lets the CLI rebuild
the float model by itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mq_core.errors import ConfigError
from mq_core.io import atomic_torch_save
from mq_core.prepare import prepare, prepare_info, resolve_ref
from mq_core.quant.qconfig import QConfig

FORMAT = "mq-checkpoint/1"


def input_specs(example_inputs: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in example_inputs]


def inputs_from_specs(specs: list[dict[str, Any]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs of the recorded shapes and dtypes (values are random: only shapes matter for prepare)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=gen).to(dtype))
        else:
            out.append(torch.zeros(spec["shape"], dtype=dtype))
    return tuple(out)


def save_checkpoint(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    model_ref: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``qmodel``'s state and preparation settings to ``path`` atomically."""
    info = prepare_info(qmodel)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    payload = {
        "format": FORMAT,
        "info": info.to_dict(),
        "state_dict": qmodel.state_dict(),
        "inputs": input_specs(inputs),
        "model_ref": model_ref,
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable mq checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an mq checkpoint (expected format {FORMAT!r}); save one with "
                          "mq.save_checkpoint(qmodel, path, example_inputs).")
    return payload


def _resolve(item: str, option: str) -> Any:
    """A recorded skip/leaf item: a module name as is, a ``"module:qualname"`` reference (a type or function, see
    ``prepare.object_ref``) imported again."""
    if ":" not in item:
        return item
    obj = resolve_ref(item)
    if obj is None:
        raise ConfigError(
            f"the checkpoint's {option} entry {item!r} cannot be imported here; pass {option}=[...] to "
            "mq.restore() explicitly."
        )
    return obj


def restore(model: nn.Module, checkpoint: dict[str, Any], **prepare_overrides: Any) -> nn.Module:
    """Prepare the float ``model`` exactly as recorded and load the checkpoint's state into it."""
    info = checkpoint["info"]
    options: dict[str, Any] = {
        "qconfig": QConfig.from_dict(info["qconfig"]),
        "mode": info["mode"],
        "modules": info["modules"] or None,
        "exact": info["exact"],
    }
    for option in ("skip", "leaf_modules"):
        if option not in prepare_overrides:
            options[option] = [_resolve(item, option) for item in info[option]]
    options.update(prepare_overrides)
    qmodel = prepare(model, info["backend"], inputs_from_specs(checkpoint["inputs"]), **options)
    try:
        qmodel.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(
            f"the checkpoint does not match the model prepared from it ({exc}). Pass the same float model "
            "architecture that was quantized."
        ) from exc
    if info["mode"] == "ptq":
        qmodel.eval()
    return qmodel
