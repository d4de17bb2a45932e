"""WaNet (Nguyen & Tran, 2021): an imperceptible smooth warp, with noise-mode rows at training time.

The warp field follows the published code: k x k control points uniform in
[-1, 1], normalised by their mean magnitude, bicubically upsampled, scaled by
s / H and added to the identity grid (align_corners=True), clamped to [-1, 1].
Noise mode adds cross_ratio times as many rows warped with an extra random
per-image field (uniform in [-1, 1] / H), keeping their true labels; those
rows are marked in the dataset's `noise` column and never used at evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cleanse.attacks.base import Attack, register
from cleanse.attacks.trigger import Trigger, to_uint8, warp
from cleanse.errors import CleanseError


def identity_grid(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=2)


@register
class WaNet(Attack):
    name = "wanet"
    summary = "smooth warping field (k control points, strength s) with noise-mode rows"
    defaults = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}
    help = {
        "k": "control grid size (4)",
        "s": "warp strength (0.5)",
        "grid_rescale": "grid rescale (1)",
        "cross_ratio": "noise rows per poisoned row (2; 0 disables noise mode)",
    }

    def make_trigger(
        self, params: dict[str, Any], channels: int, height: int, width: int, generator: torch.Generator
    ) -> Trigger:
        k, s = params["k"], params["s"]
        if k < 2 or k > min(height, width) or s <= 0 or params["cross_ratio"] < 0:
            raise CleanseError("wanet needs 2 <= k <= image size, s > 0 and cross_ratio >= 0")
        ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
        grid = ((identity_grid(height, width) + s * noise / height) * params["grid_rescale"]).clamp(-1, 1)
        return Trigger(
            "warp",
            {"grid": grid},
            0,
            (channels, height, width),
            self.name,
            dict(params),
            align_corners=True,
            extra={"noise_mode": {"cross_ratio": params["cross_ratio"], "applied": "training only"}},
        )

    def noise_rows(self, images: torch.Tensor, trigger: Trigger, generator: torch.Generator) -> torch.Tensor:
        n, height = len(images), images.shape[1]
        grid = trigger.tensors["grid"].unsqueeze(0)
        extra = torch.rand(n, *grid.shape[1:], generator=generator) * 2 - 1
        grids = (grid + extra / height).clamp(-1, 1)
        x = images.permute(0, 3, 1, 2).float()
        return to_uint8(warp(x, grids, trigger.align_corners)).permute(0, 2, 3, 1).contiguous()
