"""Batched tensor augmentation on the model's device: random flips and translations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cleanse.engine.device import to_device


def flip_translate(
    x: torch.Tensor, translate: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image horizontal flip and shift by up to `translate` pixels (reflect padding), (N,C,H,W). The random
    numbers come from `generator` on the CPU (one seeded stream on every device) and reach the device asynchronously."""
    n, _, h, w = x.shape
    device = x.device
    if flip:
        flips = to_device(torch.rand(n, generator=generator), device) < 0.5
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
    if translate > 0:
        padded = F.pad(x, (translate,) * 4, mode="reflect")
        dy = to_device(torch.randint(0, 2 * translate + 1, (n,), generator=generator), device)
        dx = to_device(torch.randint(0, 2 * translate + 1, (n,), generator=generator), device)
        rows = (torch.arange(h, device=device).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
        cols = (torch.arange(w, device=device).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w)
        batch = torch.arange(n, device=device).view(n, 1, 1, 1)
        chan = torch.arange(x.shape[1], device=device).view(1, -1, 1, 1)
        x = padded[batch, chan, rows, cols]
    return x
