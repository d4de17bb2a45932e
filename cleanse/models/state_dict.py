"""Reading bare state dicts: `.pt`/`.pth` files (never unpickling code) and the key prefixes they carry.

A torch file is read with `torch.load(..., weights_only=True)`, so a pickled object is refused, never run;
a training checkpoint's nested state dict is found by its usual key. Keys may carry a wrapper's prefix
(`module.` from DataParallel, `_orig_mod.` from torch.compile, or one shared leading name such as
`model.`), which is removed when that makes them fit the network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from cleanse.errors import CleanseError

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the `module.` / `_orig_mod.` prefix that every key carries, if one does."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def align_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Drop one leading name shared by every key (`model.`, `net.`, ...) when that makes the keys fit exactly."""
    if set(state) == expected or not state:
        return state, None
    first = next(iter(state)).split(".", 1)[0] + "."
    if all(k.startswith(first) for k in state) and {k[len(first) :] for k in state} == expected:
        return {k[len(first) :]: v for k, v in state.items()}, first
    return state, None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict itself, or the one nested in a training checkpoint ({"state_dict": ..., "epoch": 3, ...})."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        nested = [str(k) for k, v in obj.items() if _is_state_dict(v)]
        if len(nested) == 1:
            return obj[nested[0]]
        if nested:
            raise CleanseError(
                f"{path}: holds several state dicts ({', '.join(nested[:4])}); save the one to audit on "
                "its own, e.g. torch.save(ckpt[KEY], PATH)"
            )
        keys = ", ".join(str(k) for k in list(obj)[:6])
        raise CleanseError(
            f"{path}: no state dict of tensors found (top-level keys: {keys or 'none'}; looked for "
            f"{', '.join(STATE_DICT_KEYS)}); save model.state_dict() with torch.save"
        )
    raise CleanseError(
        f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict() with torch.save"
    )


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A `.pt`/`.pth` state dict, read with torch.load(weights_only=True): a pickled object is refused, never run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise CleanseError(
                f"{path}: refused to load: not a plain state dict of tensors (it pickles "
                f"{found.group(1)}, which is never run; weights_only); save model.state_dict() with "
                "torch.save, or convert to safetensors"
            ) from None
        found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        reason = found.group(1) if found else (text.strip().splitlines() or [type(exc).__name__])[0]
        raise CleanseError(
            f"{path}: refused to load: not a plain state dict of tensors, or not a torch file "
            f"(weights_only: {reason[:160]}); save model.state_dict() with torch.save, "
            "or convert to safetensors"
        ) from None
    return _find_state_dict(obj, path)
