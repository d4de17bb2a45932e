"""`vgg11-bn` for small inputs: VGG-11 features with BatchNorm and one linear head."""

from __future__ import annotations

import torch
from torch import nn

from cleanse.models.registry import ARCHITECTURES

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, config: tuple = VGG11) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@ARCHITECTURES.register("vgg11-bn")
def vgg11_bn(num_classes: int = 10) -> nn.Module:
    return VGG(num_classes)
