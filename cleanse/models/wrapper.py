"""The model every engine function takes: the bare network plus its spec, fed [0, 1] images.

The wrapper applies the checkpoint's mean/std inside `forward`, so triggers, PGD budgets and
Grad-CAM all live in pixel space. Saved state_dicts are the bare network's (`net`), without the
wrapper prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanse.models.spec import ModelSpec


class ClassifierModel(nn.Module):
    """Wraps the bare network; takes [0, 1] images and normalises them itself."""

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
        return self.net((x - self.mean) / self.std)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device
