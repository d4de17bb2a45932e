"""Tiny transformer-family networks for tests (seconds on a CPU), as `file.py:factory` architectures.

    tiny_swin       torchvision SwinTransformer, patch 4, 2 stages: (B, H, W, C) feature maps
    tiny_convnext   torchvision ConvNeXt, 2 stages of CNBlocks: (B, C, H, W) maps, LayerNorm, no BatchNorm
    hf_style        a small CNN whose forward returns an object with `.logits` (HuggingFace style)
    tuple_out       a small CNN whose forward returns (logits, features)

The registry's `vit` covers ViTs: `--arch vit --arch-arg depth=2 --arch-arg dim=32 --arch-arg heads=2
--arch-arg mlp=64`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FILE = Path(__file__).resolve()
VIT_ARGS = {"depth": 2, "dim": 32, "heads": 2, "mlp": 64}
VIT_CLI = [a for k, v in VIT_ARGS.items() for a in ("--arch-arg", f"{k}={v}")]


def arch(factory: str) -> str:
    """The --arch text of one of this file's factories."""
    return f"{FILE}:{factory}"


def tiny_swin(num_classes: int = 10) -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=num_classes, stochastic_depth_prob=0.0)


def tiny_convnext(num_classes: int = 10) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=num_classes)


class _Small(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, num_classes)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f.mean((2, 3))), f


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class HFStyle(_Small):
    def forward(self, pixel_values: torch.Tensor) -> Output:
        logits, f = self.parts(pixel_values)
        return Output(logits, f)


class TupleOut(_Small):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts(x)


def hf_style(num_classes: int = 10) -> nn.Module:
    return HFStyle(num_classes)


def tuple_out(num_classes: int = 10) -> nn.Module:
    return TupleOut(num_classes)
