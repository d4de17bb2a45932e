"""SIG (Barni et al., 2019): a horizontal sinusoidal signal added to target-class images (clean-label)."""

from __future__ import annotations

import math
from typing import Any

import torch

from cleanse.attacks.base import Attack, register
from cleanse.attacks.trigger import Trigger
from cleanse.errors import CleanseError


@register
class Sig(Attack):
    name = "sig"
    summary = "sinusoidal signal delta*sin(2*pi*j*f/W) added to target-class images, labels kept (clean-label)"
    clean_label = True
    defaults = {"delta": 40.0, "freq": 6.0}
    help = {
        "delta": "amplitude on the 0-255 scale (BackdoorBench default 40)",
        "freq": "periods across the image width (6)",
    }

    def make_trigger(
        self, params: dict[str, Any], channels: int, height: int, width: int, generator: torch.Generator
    ) -> Trigger:
        if not 0 < params["delta"] <= 255:
            raise CleanseError(f"sig delta {params['delta']} must lie in (0, 255]")
        cols = torch.arange(width, dtype=torch.float32)
        wave = params["delta"] / 255 * torch.sin(2 * math.pi * cols * params["freq"] / width)
        delta = wave.view(1, 1, width).expand(channels, height, width).contiguous()
        return Trigger("additive", {"delta": delta}, 0, (channels, height, width), self.name, dict(params))
