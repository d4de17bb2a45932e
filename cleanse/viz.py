"""Small image helpers: grids of uint8 images written as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(rows: list[torch.Tensor], scale: int = 4, gap: int = 2) -> Image.Image:
    """Lay out rows of uint8 (N,H,W,C) images, scaled up with nearest-neighbour, on a white sheet."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    cell_h, cell_w = h * scale, w * scale
    sheet = np.full(((cell_h + gap) * len(rows) + gap, (cell_w + gap) * n + gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            big = img.numpy().repeat(scale, 0).repeat(scale, 1)
            y, x = gap + i * (cell_h + gap), gap + j * (cell_w + gap)
            sheet[y : y + cell_h, x : x + cell_w] = big[..., :3]
    return Image.fromarray(sheet)


def save_png(image: Image.Image, path: str | Path) -> None:
    image.save(path, format="PNG")
