"""Penultimate-layer features: the input of the classifier head, captured with a forward pre-hook."""

from __future__ import annotations

import torch
from torch import nn

from cleanse.engine.device import autocast
from cleanse.models.layers import class_head

BATCH = 512


@torch.no_grad()
def penultimate(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    precision: str = "fp32",
    head: nn.Linear | None = None,
    batch_size: int = BATCH,
) -> torch.Tensor:
    """(N, D) float features for uint8 (N,H,W,C) images, computed in eval mode on the model's device: the input of
    `head` (default: the model's class head)."""
    head = head if head is not None else class_head(model, num_classes, "the data audit")
    device = next(model.parameters()).device
    model.eval()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().float().flatten(1)))
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device).permute(0, 3, 1, 2).float().div_(255)
            with autocast(device, precision):
                model(x.contiguous(memory_format=torch.channels_last))
    finally:
        handle.remove()
    return torch.cat(captured) if captured else torch.empty(0, head.in_features, device=device)
