"""Grad-CAM beyond conv maps: layouts by hand, token and channels-last maps against a direct autograd computation of
the formula, the default-layer rules on ViT/Swin/ConvNeXt, and --layer checked before any work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleanse.engine.gradcam import grad_cam
from cleanse.engine.layers import Layout, check_layer, default_layer, infer_layout, parse_layer, probe_layers, tar_layer
from cleanse.errors import CleanseError
from cleanse.models import new_model
from tests import tiny_archs

VIT_LAST_LN = "encoder.layers.encoder_layer_1.ln_1"


@pytest.mark.parametrize(
    ("shape", "image", "grid", "expected"),
    [
        ((2, 32, 8, 8), (32, 32), None, Layout("nchw", (8, 8), 32)),
        ((2, 24, 31, 31), (32, 32), None, Layout("nchw", (31, 31), 24)),  # unpadded convs shrink the grid
        ((2, 8, 8, 96), (32, 32), None, Layout("nhwc", (8, 8), 96)),  # (8, 96) is not a grid over 32x32
        ((2, 56, 56, 96), (224, 224), None, Layout("nhwc", (56, 56), 96)),
        ((2, 8, 8, 8), (32, 32), None, Layout("nchw", (8, 8), 8)),  # both readings fit: the PyTorch convention
        ((2, 65, 32), (32, 32), None, Layout("tokens", (8, 8), 32, 1)),  # class token + 8x8 patches
        ((2, 197, 768), (224, 224), None, Layout("tokens", (14, 14), 768, 1)),  # ViT-B/16
        ((2, 201, 384), (224, 224), None, Layout("tokens", (14, 14), 384, 5)),  # class + 4 register tokens
        ((2, 196, 768), (224, 224), None, Layout("tokens", (14, 14), 768, 0)),  # no prefix (global-pool ViTs)
        ((2, 36, 64), (224, 160), None, Layout("tokens", (7, 5), 64, 1)),  # not square: patch 32 on 224x160
        ((2, 65, 32), (32, 32), (4, 16), Layout("tokens", (4, 16), 32, 1)),  # a grid given wins
        ((2, 8, 8, 96), (32, 32), (8, 8), Layout("nhwc", (8, 8), 96)),
        ((2, 10), (32, 32), None, None),  # logits
        ((2, 3, 200, 5), (32, 32), None, None),
        ((2, 65, 32), (32, 32), (9, 9), None),  # 81 > 65 tokens
    ],
)
def test_layouts_by_hand(shape, image, grid, expected):
    assert infer_layout(shape, image, grid) == expected


def test_layout_maps_tokens_onto_the_grid_row_by_row():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)  # 1 prefix token + a 2x3 grid, 3 channels
    grid = Layout("tokens", (2, 3), 3, 1).to_map(tokens)
    assert grid.shape == (2, 3, 2, 3)
    assert torch.equal(grid[1, 2, 1, 0], tokens[1, 1 + 3, 2])  # row 1, column 0 is patch token 3 after the prefix
    nhwc = torch.rand(2, 4, 5, 6)
    assert torch.equal(Layout("nhwc", (4, 5), 6).to_map(nhwc)[:, :, 3, 2], nhwc[:, 3, 2, :])


def test_parse_layer():
    assert parse_layer("blocks.11") == ("blocks.11", None)
    assert parse_layer("blocks.11@14x14") == ("blocks.11", (14, 14))
    with pytest.raises(CleanseError, match="grid after @ must be positive"):
        parse_layer("blocks.11@0x14")


def _reference_cam(model, x, layer_name, cls, to_map):
    """The formula the long way for one image: retain the layer's output, backpropagate the logit, map, weight."""
    store = []
    module = dict(model.net.named_modules())[layer_name]
    handle = module.register_forward_hook(lambda m, a, o: store.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    activation = store[0]
    (grads,) = torch.autograd.grad(logits[0, cls], activation)
    a, g = to_map(activation.detach())[0], to_map(grads)[0]
    cam = torch.relu((g.mean(dim=(1, 2)).view(-1, 1, 1) * a).sum(0))
    return F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]


def _vit(**extra):
    torch.manual_seed(0)
    model = new_model("vit", 5, arch_args={**tiny_archs.VIT_ARGS, **extra}).eval()
    torch.nn.init.normal_(model.net.heads.head.weight, std=0.5)  # torchvision zeroes the head: no gradient at all
    return model


def test_grad_cam_on_vit_tokens_matches_the_formula():
    model = _vit()
    x = torch.rand(3, 3, 32, 32)
    result = grad_cam(model, x, VIT_LAST_LN)

    def drop_class_token(t):
        return t[:, 1:, :].reshape(t.shape[0], 8, 8, t.shape[2]).permute(0, 3, 1, 2)

    for i in range(3):
        ref = _reference_cam(model, x[i : i + 1], VIT_LAST_LN, int(result.classes[i]), drop_class_token)
        assert torch.allclose(result.cams[i], ref, atol=1e-5)
    assert result.cams.shape == (3, 32, 32) and result.cams.sum() > 0


def test_grad_cam_on_swin_channels_last_maps_matches_the_formula():
    torch.manual_seed(0)
    model = new_model(tiny_archs.arch("tiny_swin"), 5).eval()
    layer = "features.1.0"  # a Swin block: (B, 8, 8, 16) channels last
    x = torch.rand(2, 3, 32, 32)
    result = grad_cam(model, x, layer)
    for i in range(2):
        ref = _reference_cam(model, x[i : i + 1], layer, int(result.classes[i]), lambda t: t.permute(0, 3, 1, 2))
        assert torch.allclose(result.cams[i], ref, atol=1e-5)
    assert result.cams.sum() > 0


def test_default_layers_follow_the_gradient_not_names():
    vit = _vit(depth=3)
    infos = {i.name: i for i in probe_layers(vit, (3, 32, 32))}
    # the class token alone feeds the head: the last block's output and MLP have no gradient on the patches
    assert infos["encoder.layers.encoder_layer_2"].reach == 0
    assert infos["encoder.layers.encoder_layer_2.mlp"].reach == 0
    assert infos["encoder.layers.encoder_layer_2.ln_1"].reach == 1
    # the last block's input (pytorch-grad-cam's ViT advice: blocks[-1].norm1 normalises it), never conv_proj
    assert default_layer(vit, (3, 32, 32)) == tar_layer(vit, (3, 32, 32)) == "encoder.layers.encoder_layer_1"
    swin = new_model(tiny_archs.arch("tiny_swin"), 5).eval()
    assert {i.name: i.layout.kind for i in probe_layers(swin, (3, 32, 32))}["features.3.0"] == "nhwc"
    assert tar_layer(swin, (3, 32, 32)) == "permute"  # the last stage's output, 4x4 = input/8
    convnext = new_model(tiny_archs.arch("tiny_convnext"), 5).eval()
    assert tar_layer(convnext, (3, 32, 32)) == "features" and default_layer(convnext, (3, 32, 32)) == "features"


def test_a_vit_head_zeroed_at_initialisation_still_has_layers():
    torch.manual_seed(0)
    model = new_model("vit", 5, arch_args=tiny_archs.VIT_ARGS).eval()
    assert torch.count_nonzero(model.net.heads.head.weight) == 0
    assert default_layer(model, (3, 32, 32)) == "encoder.layers.encoder_layer_0"


def test_check_layer_refuses_with_the_reason_and_the_valid_names():
    model = _vit()
    assert check_layer(model, VIT_LAST_LN, (3, 32, 32)) == Layout("tokens", (8, 8), 32, 1)
    with pytest.raises(CleanseError, match=r"unknown layer 'nope'; layers Grad-CAM can use \(deepest last\): .*"):
        check_layer(model, "nope", (3, 32, 32))
    with pytest.raises(CleanseError, match="'heads.head' does not output a feature map on the image grid"):
        check_layer(model, "heads.head", (3, 32, 32))
    with pytest.raises(CleanseError, match="'encoder.layers.encoder_layer_1' has no gradient from the prediction"):
        check_layer(model, "encoder.layers.encoder_layer_1", (3, 32, 32))
    with pytest.raises(CleanseError, match="does not output a feature map on a 9x9 grid"):
        check_layer(model, f"{VIT_LAST_LN}@9x9", (3, 32, 32))
    assert check_layer(model, f"{VIT_LAST_LN}@4x16", (3, 32, 32)) == Layout("tokens", (4, 16), 32, 1)
    try:
        check_layer(model, "nope", (3, 32, 32))
    except CleanseError as exc:
        listed = str(exc).split(": ", 1)[1].split(", ")
    assert listed[-1] == VIT_LAST_LN and "conv_proj" in listed and "encoder.layers.encoder_layer_1" not in listed


def test_grad_cam_survives_an_inplace_operation_after_the_layer():
    torch.manual_seed(0)
    model = new_model("torchvision:resnet18", 5, input_size=(3, 64, 64)).eval()
    result = grad_cam(model, torch.rand(2, 3, 64, 64), "layer4.1.bn2")  # followed by `out += identity`
    assert torch.isfinite(result.cams).all() and (result.cams >= 0).all()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "side", "prefix"),
    [("deit_tiny_distilled_patch16_224", 64, 2), ("vit_small_patch14_reg4_dinov2", 56, 5)],
)
def test_timm_vits_with_distillation_and_register_tokens(name, side, prefix):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = new_model(f"timm:{name}", 5, input_size=(3, side, side), arch_args={"depth": 2}).eval()
    infos = {i.name: i for i in probe_layers(model, (3, side, side))}
    assert infos["blocks.0"].layout == Layout("tokens", (4, 4), infos["blocks.0"].layout.channels, prefix)
    assert default_layer(model, (3, side, side)) == tar_layer(model, (3, side, side)) == "blocks.0"
    assert grad_cam(model, torch.rand(2, 3, side, side), "blocks.0").cams.shape == (2, side, side)
