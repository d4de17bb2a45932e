"""Heatmap pictures: a perceptual colormap (inferno) and image | heatmap | overlay panels."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from cleanse.viz import image_grid


@functools.lru_cache(maxsize=1)
def _inferno() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """[0,1] maps (N,H,W) -> uint8 RGB (N,H,W,3) through the inferno colormap."""
    idx = (heat.detach().float().cpu().clamp(0, 1) * 255).round().long()
    return torch.from_numpy(_inferno())[idx]


def overlay(images: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend the coloured map over uint8 images (N,H,W,3)."""
    mixed = (1 - alpha) * images.float() + alpha * colorize(heat).float()
    return mixed.round().clamp(0, 255).to(torch.uint8)


def panel(
    image: torch.Tensor,
    heat: torch.Tensor,
    scale: int = 6,
    *,
    col_labels: list[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """One picture: the image, its heatmap and the overlay side by side, optionally headed (see image_grid)."""
    row = torch.stack([image, colorize(heat[None])[0], overlay(image[None], heat[None])[0]])
    return image_grid([row], scale=scale, col_labels=col_labels, title=title)
