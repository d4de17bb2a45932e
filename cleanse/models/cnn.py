"""`cnn`: the fast default for CPU, an airbench-style network.

A frozen 2x2 patch-whitening first layer (computed from the training images),
three conv blocks with BatchNorm and GELU, global max pooling and a scaled
linear head. About 2M parameters at the default widths. The design follows
Keller Jordan's airbench (CIFAR-10 speedruns); the code here is our own.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanse.models.registry import ARCHITECTURES


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale and a learned shift, as in airbench."""

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        # Partial identity init: the first in_channels filters pass their input through.
        nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = Conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(out_channels)
        self.conv2 = Conv(out_channels, out_channels)
        self.norm2 = BatchNorm(out_channels)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class AirCNN(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (64, 256, 256),
        whiten_kernel: int = 2,
        in_channels: int = 3,
        scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        whiten_width = 2 * in_channels * whiten_kernel**2
        self.whiten = nn.Conv2d(in_channels, whiten_width, kernel_size=whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.activ = nn.GELU()
        self.layer1 = ConvGroup(whiten_width, widths[0])
        self.layer2 = ConvGroup(widths[0], widths[1])
        self.layer3 = ConvGroup(widths[1], widths[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from 2x2 patches of (normalised) training images."""
        c, k = images.size(1), self.whiten.kernel_size[0]
        patches = images.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c, k, k).float()
        flat = patches.reshape(len(patches), -1)
        flat = flat - flat.mean(0, keepdim=True)
        cov = flat.T @ flat / len(flat)
        # a (c*k*k)-square matrix: decomposed on the CPU (MPS has no eigh)
        eigenvalues, eigenvectors = (t.to(cov.device) for t in torch.linalg.eigh(cov.cpu()))
        eigenvectors = eigenvectors.T.reshape(-1, c, k, k)
        filters = eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps).view(-1, 1, 1, 1)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.whiten(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(self.flatten(self.pool(x))) * self.scale


@ARCHITECTURES.register("cnn")
def cnn(num_classes: int = 10, width: str = "64,256,256") -> nn.Module:
    widths = tuple(int(w) for w in str(width).split(","))
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError("cnn width must be three positive integers, e.g. 64,256,256")
    return AirCNN(num_classes=num_classes, widths=widths)
