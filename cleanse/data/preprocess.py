"""Fitting images of another size to a model's input: a plain resize, or ImageNet-style resize-then-center-crop.

`resize` stretches the image to the input size (aspect ratio not kept): cleanse's behaviour before models recorded
a preprocessing. `center-crop` is the evaluation transform of torchvision's ImageNet weights and of timm: scale the
image, keeping its aspect ratio, so that it covers floor(size / 0.875) pixels (256 for 224; timm's
`crop_pct=0.875`, `scale_size = floor(img_size / crop_pct)`), then cut the centre size x size
(torchvision's `CenterCrop`: offsets int(round((resized - size) / 2))).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from cleanse.errors import CleanseError

PREPROCESSING = ("resize", "center-crop")
CROP_PCT = 0.875
RESIZE_CHUNK = 256  # images resized at once: bounds the float copies to a few hundred images


def check_preprocess(name: str, what: str = "--preprocess") -> str:
    if name not in PREPROCESSING:
        raise CleanseError(f"{what} {name!r} is unknown; choose one of {', '.join(PREPROCESSING)}")
    return name


def scaled_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) an image of `height` x `width` is scaled to before the centre `size` crop.

    For a square target this is torchvision's `Resize(floor(S / 0.875))`: the shorter side becomes that length and the
    longer one int(length * long / short). A non-square target scales so that both sides cover their own length.
    """
    cover_h, cover_w = math.floor(size[0] / CROP_PCT), math.floor(size[1] / CROP_PCT)
    if height * cover_w >= width * cover_h:  # the width is the binding side
        return int(cover_w * height / width), cover_w
    return cover_h, int(cover_h * width / height)


def crop_offsets(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """Top and left of the centre `size` crop of a `height` x `width` image."""
    return int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))


def fit_tensor(images: torch.Tensor, size: tuple[int, int], preprocess: str = "resize") -> torch.Tensor:
    """uint8 (N, H, W, C) images fitted to `size`: bilinear with antialiasing, rounded back to uint8."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    scaled = scaled_size(x.shape[2], x.shape[3], size) if preprocess == "center-crop" else tuple(size)
    x = torch.nn.functional.interpolate(x, size=scaled, mode="bilinear", antialias=True, align_corners=False)
    if preprocess == "center-crop":
        top, left = crop_offsets(scaled[0], scaled[1], size)
        x = x[:, :, top : top + size[0], left : left + size[1]]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def fit_array(image: np.ndarray, size: tuple[int, int], preprocess: str = "resize") -> np.ndarray:
    """One decoded uint8 (H, W, 3) image fitted to `size` with Pillow's bilinear filter (as ImageFolder decoding)."""
    pil = Image.fromarray(image)
    if preprocess != "center-crop":
        return np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    scaled = scaled_size(image.shape[0], image.shape[1], size)
    pil = pil.resize((scaled[1], scaled[0]), Image.Resampling.BILINEAR)
    top, left = crop_offsets(scaled[0], scaled[1], size)
    return np.asarray(pil.crop((left, top, left + size[1], top + size[0])))


def fit_in_chunks(
    images: torch.Tensor, size: tuple[int, int], preprocess: str = "resize", chunk: int = RESIZE_CHUNK
) -> torch.Tensor:
    """`fit_tensor` over `chunk` images at a time into one preallocated uint8 result (images may be memory-mapped)."""
    out = torch.empty((len(images), size[0], size[1], images.shape[3]), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        out[start : start + chunk] = fit_tensor(images[start : start + chunk], size, preprocess)
    return out
