"""Batched tensor augmentation on the model's device: random flips and translations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cleanse.engine.device import to_device


def flip_translate(
    x: torch.Tensor,
    translate: int,
    flip: bool,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Per-image horizontal flip and shift by up to `translate` pixels (reflect padding), (N,C,H,W). The random
    numbers come from `generator` on the CPU (one seeded stream on every device) and reach the device asynchronously.

    With `shard` = (rank, world), x holds every world-th image of a global batch of N*world from the rank on: the
    numbers are drawn for the global batch, so each image gets exactly the draws it gets in one process. `total` is the
    global batch's size when it does not split evenly (a last, short batch); default N*world."""
    n, _, h, w = x.shape
    device = x.device
    rank, world = shard or (0, 1)
    total = n * world if total is None else total

    def mine(draws: torch.Tensor) -> torch.Tensor:
        return to_device(draws[rank::world], device)

    if flip:
        flips = mine(torch.rand(total, generator=generator)) < 0.5
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
    if translate > 0:
        padded = F.pad(x, (translate,) * 4, mode="reflect")
        dy = mine(torch.randint(0, 2 * translate + 1, (total,), generator=generator))
        dx = mine(torch.randint(0, 2 * translate + 1, (total,), generator=generator))
        rows = (torch.arange(h, device=device).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
        cols = (torch.arange(w, device=device).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w)
        batch = torch.arange(n, device=device).view(n, 1, 1, 1)
        chan = torch.arange(x.shape[1], device=device).view(1, -1, 1, 1)
        x = padded[batch, chan, rows, cols]
    return x
