"""Optimiser and random-number state as flat tensors plus JSON, for resumable checkpoints (never pickle).

`train --checkpoint-every` and `unlearn --checkpoint-every` both store their state this way in a
safetensors file: tensors under prefixed names, everything else in the file's JSON metadata.
"""

from __future__ import annotations

from typing import Any

import torch


def pack_optimizer(
    optimizer: torch.optim.Optimizer, prefix: str = "optimizer"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors `<prefix>.<param index>.<name>` and a JSON part: param_groups and the non-tensor per-parameter state."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in saved["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().clone()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": saved["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], doc: dict[str, Any], prefix: str = "optimizer"
) -> None:
    """Load what pack_optimizer wrote; raises KeyError/ValueError when it does not fit the optimiser."""
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in doc["scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": doc["param_groups"]})


def pack_rng(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The recipe's or trainer's own generator, torch's global generator and, on CUDA or MPS, the device's."""
    tensors = {"rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        tensors["rng.mps"] = torch.mps.get_rng_state()
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], gen: torch.Generator, device: torch.device) -> None:
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    if "rng.mps" in tensors and device.type == "mps":
        torch.mps.set_rng_state(tensors["rng.mps"])
