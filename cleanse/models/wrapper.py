"""The model every engine function takes: the bare network plus its spec, fed [0, 1] images.

The wrapper applies the checkpoint's mean/std inside `forward`, so triggers, PGD budgets and
Grad-CAM all live in pixel space, and it reduces whatever the network returns to its logits
(`logits_of`), so every caller writes `model(x)` and gets a tensor. Saved state_dicts are the bare
network's (`net`), without the wrapper prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cleanse.errors import CleanseError
from cleanse.models.spec import ModelSpec

NEEDS = (
    "cleanse needs the class logits: a tensor, a mapping or an object with a 'logits' tensor, "
    "or a tuple/list whose first item is the logits tensor; wrap the network in a file.py:factory that returns them"
)


def _describe(out: Any) -> str:
    """What a network returned, for the error message."""
    if isinstance(out, Mapping):
        keys = ", ".join(repr(k) for k in list(out)[:6]) + (", ..." if len(out) > 6 else "")
        return f"a {type(out).__name__} with keys {keys or '(none)'}"
    if isinstance(out, (tuple, list)):
        first = type(out[0]).__name__ if out else "nothing"
        return f"a {type(out).__name__} of {len(out)} items whose first is {first}"
    if hasattr(out, "logits"):
        return f"a {type(out).__name__} whose 'logits' is {type(out.logits).__name__}"
    return f"a {type(out).__name__}"


def logits_of(out: Any) -> torch.Tensor:
    """The logits in what a network's forward returned: the one place that adapts network outputs.

    Accepted, in this order:
      1. a tensor: the logits themselves (torchvision, timm, the registry);
      2. a Mapping with a "logits" key (a dict, or a HuggingFace `ModelOutput`): `out["logits"]`;
      3. an object with a tensor attribute `logits` (dataclass-style outputs): `out.logits`;
      4. a tuple or list whose first item is a tensor, e.g. `(logits, features)` or torchvision's
         `InceptionOutputs`: `out[0]`.
    Anything else is a CleanseError (exit 2) naming what the network returned and what cleanse needs.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CleanseError(f"the network's forward returned {_describe(out)}; {NEEDS}")


class ClassifierModel(nn.Module):
    """Wraps the bare network; takes [0, 1] images, normalises them itself and returns logits."""

    mean: torch.Tensor  # (1, C, 1, 1) buffers, not saved: the metadata holds them
    std: torch.Tensor

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        channels = spec.input_size[0]
        self.register_buffer(
            "mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1), persistent=False
        )
        self.notes: list[str] = []  # warnings from loading, shown by the CLI
        self.source_sha256: str | None = None  # sha256 of the file it was loaded from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.net((x - self.mean) / self.std))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device
