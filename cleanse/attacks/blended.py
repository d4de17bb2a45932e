"""Blended (Chen et al., 2017): the whole image blended with a pattern at a constant alpha."""

from __future__ import annotations

from typing import Any

import torch

from cleanse.attacks.base import Attack, load_pattern_image, register
from cleanse.attacks.trigger import Trigger
from cleanse.errors import CleanseError


@register
class Blended(Attack):
    name = "blended"
    summary = "blend a pattern over the whole image at alpha (default: seeded uniform noise, alpha 0.2)"
    defaults = {"alpha": 0.2, "image": ""}
    help = {
        "alpha": "blend weight of the pattern, in (0, 1] (BackdoorBench uses 0.2)",
        "image": "a PNG/JPEG pattern (resized to the image size); default: uniform noise from --seed",
    }

    def make_trigger(
        self, params: dict[str, Any], channels: int, height: int, width: int, generator: torch.Generator
    ) -> Trigger:
        alpha = params["alpha"]
        if not 0 < alpha <= 1:
            raise CleanseError(f"blended alpha {alpha} must lie in (0, 1]")
        if params["image"]:
            pattern = load_pattern_image(params["image"], channels, height, width, nearest=False, what="blend")
        else:
            pattern = torch.rand(channels, height, width, generator=generator)
        mask = torch.full((height, width), float(alpha))
        return Trigger(
            "blend", {"mask": mask, "pattern": pattern}, 0, (channels, height, width), self.name, dict(params)
        )
