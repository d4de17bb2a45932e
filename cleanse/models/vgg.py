"""`vgg11-bn` for small inputs: VGG-11 features with BatchNorm and one linear head.

`width` scales every convolution's channel count (`max(8, round(c * width))`); the default 1.0 is the
full 64..512 network, with the same layers and state-dict keys at every width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cleanse.models.registry import ARCHITECTURES

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
MAX_WIDTH = 4.0


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, config: tuple = VGG11, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                channels = max(8, round(item * width))
                layers += [
                    nn.Conv2d(in_channels, channels, 3, padding=1),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@ARCHITECTURES.register("vgg11-bn")
def vgg11_bn(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or not 0 < width <= MAX_WIDTH
    ):
        raise ValueError(f"vgg11-bn width must be a number in (0, {MAX_WIDTH:g}], e.g. 0.25; got {width!r}")
    return VGG(num_classes, width=float(width))
