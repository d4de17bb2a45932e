"""`vit`: a Vision Transformer sized for small inputs, built from torchvision's `VisionTransformer`.

The defaults (patch 4 on 32x32 inputs: an 8x8 token grid plus a class token; 6 blocks of width 192, 3 heads,
MLP width 384; 1.8M parameters at 10 classes) follow the small CIFAR ViTs of the literature. `image_size` is the
square input side; torchvision's ViT accepts only that size. Layer names are torchvision's
(`conv_proj`, `encoder.layers.encoder_layer_N`, `heads.head`), so checkpoints load into
`torchvision.models.VisionTransformer` with the same arguments.
"""

from __future__ import annotations

from torch import nn

from cleanse.models.registry import ARCHITECTURES


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"vit {name} must be a positive integer; got {value!r}")
    return value


@ARCHITECTURES.register("vit")
def vit(
    num_classes: int = 10,
    image_size: int = 32,
    patch: int = 4,
    depth: int = 6,
    dim: int = 192,
    heads: int = 3,
    mlp: int = 384,
) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    sizes = {n: _positive(n, v) for n, v in dict(image_size=image_size, patch=patch, depth=depth, dim=dim).items()}
    _positive("heads", heads)
    _positive("mlp", mlp)
    if sizes["image_size"] % sizes["patch"]:
        raise ValueError(f"vit image_size {image_size} must be a multiple of patch {patch}")
    if dim % heads:
        raise ValueError(f"vit dim {dim} must be a multiple of heads {heads}")
    return VisionTransformer(image_size, patch, depth, heads, dim, mlp, num_classes=num_classes)
