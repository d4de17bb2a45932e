"""Saying why weights do not fit a network: the first missing, unexpected and mis-shaped keys, and the likely cause."""

from __future__ import annotations

import torch
from torch import nn

from cleanse.models.spec import ModelSpec


def natural_key(key: str) -> tuple:
    """Sort key for state-dict names: layer2.10 after layer2.9 (safetensors files store keys in no useful order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def head_hint(state: dict[str, torch.Tensor]) -> str:
    """'; head.weight has 10 outputs' from the last 2-D weight by name (usually the classifier), for error messages."""
    for key in sorted(state, key=natural_key, reverse=True):
        if key.endswith("weight") and state[key].dim() == 2:
            return f"; {key} has {state[key].shape[0]} outputs"
    return ""


def _first(keys: list[str], n: int = 3) -> str:
    return f"{', '.join(keys[:n])}{' ...' if len(keys) > n else ''} ({len(keys)})"


def describe_mismatch(net: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec) -> str | None:
    """One line naming the first missing/unexpected/mis-shaped keys and the likely cause; None when the weights fit."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = sorted((k for k in state if k not in expected), key=natural_key)
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_first(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
        parts.append(f"shape mismatches {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''} ({len(shapes)})")
    head_only = (
        not missing
        and not unexpected
        and all(
            expected[k].dim() >= 1
            and state[k].dim() == expected[k].dim()
            and expected[k].shape[0] == spec.num_classes
            and state[k].shape[0] != spec.num_classes
            and state[k].shape[1:] == expected[k].shape[1:]
            for k in mismatched
        )
    )
    if head_only:
        counts = sorted({int(state[k].shape[0]) for k in mismatched})
        cause = f"wrong class count (--num-classes {spec.num_classes})"
        if len(counts) == 1:
            cause += f"; the weights have {counts[0]} classes: pass --num-classes {counts[0]}"
    elif not missing and not unexpected:
        given = ",".join(f"{k}={v}" for k, v in spec.arch_args.items()) or "none"
        cause = (
            f"wrong architecture arguments (--arch-arg, given: {given}): the layer names fit {spec.arch} "
            "but their sizes do not; or a different --arch"
        )
    else:
        first = ", ".join(sorted(state, key=natural_key)[:2])
        cause = f"wrong architecture (--arch {spec.arch}); the file's first keys are {first}"
    return f"weights do not fit {spec.arch}: {'; '.join(parts)}; likely cause: {cause}"
