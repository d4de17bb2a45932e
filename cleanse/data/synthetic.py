"""The built-in synthetic dataset: ten shape classes on noisy, coloured backgrounds.

Deterministic from a fixed seed (independent of --seed), generated in well
under a second. The class is the shape (disk, ring, stripes ...), drawn at a
random position, size, rotation and colour over a random gradient with noise
and a random distractor blob, so colour or position alone does not give it
away and a model needs real training; a small corner patch stays learnable
without being the only strong signal in the image.
"""

from __future__ import annotations

import math

import torch

from cleanse.data.dataset import Dataset

CLASSES = ["disk", "square", "ring", "cross", "triangle", "stripes", "checker", "dumbbell", "target", "crescent"]
SPLITS = {"train": (5000, 20261), "test": (1000, 20262)}


def _shape_masks(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    d = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    shapes = torch.stack(
        [
            d < r,
            torch.maximum(au, av) < 0.8 * r,
            (d - 0.75 * r).abs() < 0.22 * r,
            ((au < 0.28 * r) & (av < r)) | ((av < 0.28 * r) & (au < r)),
            (v < 0.6 * r) & (v > -r) & (au < (v + r) * 0.58),
            (d < r) & (torch.sin(u * (2 * math.pi) / (0.55 * r)) > 0),
            (torch.maximum(au, av) < 0.8 * r) & ((torch.floor(u / (0.4 * r)) + torch.floor(v / (0.4 * r))) % 2 == 0),
            (torch.sqrt((au - 0.6 * r) ** 2 + v * v) < 0.42 * r),
            (d < 0.3 * r) | ((d - 0.8 * r).abs() < 0.15 * r),
            (d < r) & (torch.sqrt((u - 0.55 * r) ** 2 + v * v) > 0.85 * r),
        ]
    )  # (10, N, H, W)
    return shapes[label, torch.arange(len(label))]


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel row and column coordinates, (size, size) each."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    return ys, xs


def _placed_shapes(
    shape: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, size: int, g: torch.Generator
) -> torch.Tensor:
    """(N, H, W) float masks: shape index `shape[i]` at a random centre, radius and rotation (drawn from `g` in
    that order)."""
    count = len(shape)
    s = size / 32
    cx = (9 + 14 * torch.rand(count, generator=g)) * s
    cy = (9 + 14 * torch.rand(count, generator=g)) * s
    r = (6 + 4 * torch.rand(count, generator=g)) * s
    theta = 2 * math.pi * torch.rand(count, generator=g)
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    return _shape_masks(u, v, r.view(-1, 1, 1), shape).float()


def _ramp(count: int, xs: torch.Tensor, ys: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """(count, H, W) linear gradients from -0.5 to 0.5 across the image, each along a random direction."""
    angle = 2 * math.pi * torch.rand(count, generator=g)
    return (torch.cos(angle).view(-1, 1, 1) * xs + torch.sin(angle).view(-1, 1, 1) * ys) / size - 0.5


def make_synthetic(split: str = "train", n: int | None = None, size: int = 32) -> Dataset:
    count, seed = SPLITS[split]
    count = count if n is None else n
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    label = torch.arange(count) % len(CLASSES)
    label = label[torch.randperm(count, generator=g)]

    ys, xs = _grid(size)
    fg_mask = _placed_shapes(label, xs, ys, size, g)

    bg = rand(count, 3)
    fg = rand(count, 3)
    # Keep enough contrast between shape and background: push the colour away along luminance.
    close = (fg.mean(1) - bg.mean(1)).abs() < 0.3
    fg[close] = (1 - bg[close]) * 0.8 + 0.1
    ramp = _ramp(count, xs, ys, size, g).unsqueeze(1) * (0.4 * rand(count, 1, 1, 1))
    background = bg.view(-1, 3, 1, 1) + ramp
    image = background * (1 - fg_mask.unsqueeze(1)) + fg.view(-1, 3, 1, 1) * fg_mask.unsqueeze(1)

    # A distractor blob in about half of the images.
    bx, by, br = rand(count) * size, rand(count) * size, (1.5 + 2 * rand(count)) * (size / 32)
    blob = ((xs - bx.view(-1, 1, 1)) ** 2 + (ys - by.view(-1, 1, 1)) ** 2 < br.view(-1, 1, 1) ** 2).float()
    blob = blob * (rand(count) < 0.5).float().view(-1, 1, 1)
    image = image * (1 - blob.unsqueeze(1)) + rand(count, 3, 1, 1) * blob.unsqueeze(1)

    image = image + 0.06 * torch.randn(image.shape, generator=g)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    name = "synthetic" if split == "train" else f"synthetic:{split}"
    return Dataset(images, label.long(), list(CLASSES), name, meta={"source": name})


def make_many_classes(classes: int, n: int, size: int = 64, seed: int = 0, chunk: int = 1000) -> Dataset:
    """A synthetic set with any number of classes (for scale benchmarks): class k is shape k % 10 drawn in palette
    colour k // 10 (evenly spaced hues), over a grey gradient with noise; `n` images, classes in equal shares (the
    first n % classes one more), shuffled. Deterministic from `seed`; drawn `chunk` images at a time, so memory
    stays that of the uint8 result."""
    if classes < 2 or n < classes:
        raise ValueError(f"need at least 2 classes and one image per class; got {classes} classes, {n} images")
    g = torch.Generator().manual_seed(seed)
    label = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    images = torch.empty((n, size, size, 3), dtype=torch.uint8)
    groups = math.ceil(classes / len(CLASSES))
    for start in range(0, n, chunk):
        part = label[start : start + chunk]
        images[start : start + len(part)] = _many_class_images(part, size, groups, g)
    names = [f"{CLASSES[k % len(CLASSES)]}-{k // len(CLASSES)}" for k in range(classes)]
    source = f"synthetic-{classes}-classes"
    return Dataset(images, label.long(), names, source, meta={"source": source})


def _many_class_images(label: torch.Tensor, size: int, groups: int, g: torch.Generator) -> torch.Tensor:
    n = len(label)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    hue = (label // len(CLASSES)).float() / groups
    phase = torch.stack([hue, hue + 2 / 3, hue + 1 / 3], 1) * 2 * math.pi  # one hue per group of ten classes
    fg = 0.45 + 0.45 * torch.cos(phase)
    ys, xs = _grid(size)
    mask = _placed_shapes(label % len(CLASSES), xs, ys, size, g).unsqueeze(1)
    grey = 0.15 + 0.7 * rand(n, 1)  # a grey background, so the hue belongs to the shape
    ramp = _ramp(n, xs, ys, size, g)
    background = grey.view(-1, 1, 1, 1) + ramp.unsqueeze(1) * (0.3 * rand(n, 1, 1, 1))
    image = background * (1 - mask) + (fg + 0.05 * torch.randn(n, 3, generator=g)).view(-1, 3, 1, 1) * mask
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
