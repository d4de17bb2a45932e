"""Batched Grad-CAM on the model's device, and the Trigger Attention Ratio (TAR).

Grad-CAM (Selvaraju et al., 2017) for class c at layer activation A, viewed as (N,K,h,w) by its layout
(engine/layers.py: conv maps as they are, channels-last maps permuted, tokens without their prefix tokens laid
on the patch grid, as pytorch-grad-cam's reshape_transform does for ViTs):
    w_k = mean over (i, j) of d score_c / d A_k(i, j)
    map = ReLU(sum_k w_k * A_k), bilinearly upsampled to the input size.
score_c is the pre-softmax logit. Gradients are taken with torch.autograd.grad
with respect to the hooked activation only, so parameter .grad buffers and
BatchNorm statistics are never touched; the whole batch stays on the device.

TAR for a triggered image with trigger region M and map A:
    TAR = mean(A over M) / (mean(A outside M) + eps),  attention share = sum(A*M) / (sum(A) + eps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.engine.device import wide_float
from cleanse.engine.layers import first_tensor, infer_layout, parse_layer, resolve_layer
from cleanse.errors import CleanseError

EPS = 1e-8


@contextlib.contextmanager
def capture(module: nn.Module, start_grad: bool = False) -> Iterator[list[torch.Tensor]]:
    """Record the module's output (the first item of a tuple output) on every forward; the hook is always removed.

    With `start_grad`, the output is replaced by a detached leaf that requires grad and
    autograd is switched on from there: run the forward under torch.no_grad() and only
    the part of the network after the layer is recorded for the backward pass. The network
    receives a copy of the leaf, so an in-place operation after the layer (ReLU(inplace=True))
    is allowed.
    """
    store: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: object, out: object) -> object:
        t = first_tensor(out)
        if t is None:
            raise CleanseError(
                f"layer {type(mod).__name__} returns {type(out).__name__}, not a tensor; choose another --layer"
            )
        if not start_grad:
            store.append(t)
            return None
        leaf = t.detach().requires_grad_(True)
        torch.set_grad_enabled(True)
        store.append(leaf)
        passed = leaf.clone()
        if isinstance(out, (tuple, list)):
            return type(out)([passed, *out[1:]])
        return passed

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
        store.clear()


@dataclass
class CamResult:
    cams: torch.Tensor  # (N, H, W) non-negative, un-normalised, on the model's device
    logits: torch.Tensor  # (N, C)
    classes: torch.Tensor  # (N,) the class each map explains


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str, target: torch.Tensor | None = None) -> CamResult:
    """Grad-CAM maps for a batch of [0,1] images (N,C,H,W) at `layer`, for `target` (default: predicted)."""
    name, grid = parse_layer(layer)
    module = resolve_layer(model, name)
    was_training = model.training
    model.eval()
    try:
        with capture(module, start_grad=True) as store, torch.no_grad():
            logits = model(x.contiguous(memory_format=torch.channels_last))
            if len(store) != 1:
                raise CleanseError(
                    f"layer {layer!r} runs {len(store)} times per forward; choose a layer that runs once"
                )
            activation = store[0]
            layout = infer_layout(activation.shape, (x.shape[2], x.shape[3]), grid)
            if layout is None:
                raise CleanseError(
                    f"layer {name!r} outputs {tuple(activation.shape[1:])} per image, not a feature map on the "
                    "image grid; choose another --layer (or give a token grid: NAME@HxW)"
                )
            classes = logits.argmax(1) if target is None else target.to(logits.device)
            score = logits.gather(1, classes.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, activation)
        feature_map, grad_map = layout.to_map(activation.detach()), layout.to_map(grads)
        weights = grad_map.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feature_map).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    finally:
        model.train(was_training)
    return CamResult(cam.clamp_min(0), logits.detach(), classes.detach())


def normalise(cams: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """Min-max to [0, 1]: per image, or with one scale across the whole batch."""
    if shared:
        lo, hi = cams.min(), cams.max()
    else:
        flat = cams.flatten(1)
        lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    span = hi - lo
    # scale-free: a map whose values are all tiny still spans [0, 1]; a constant map is all zeros
    return torch.where(
        span > 0, (cams - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(cams)
    )


def tar_and_share(cams: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image TAR and attention share; NaN where undefined (empty or over-half region, zero map)."""
    m = region.to(cams.device, torch.bool)
    inside, total = m.sum(), m.numel()
    if inside == 0 or inside > total / 2:
        nan = torch.full((len(cams),), float("nan"), device=cams.device)
        return nan, nan
    wide = wide_float(cams.device)  # sums over many pixels; float64 where the device has it (not MPS)
    a = cams.flatten(1).to(wide)
    mf = m.flatten().to(wide)
    sum_in = a @ mf
    sum_all = a.sum(1)
    mean_in = sum_in / inside
    mean_out = (sum_all - sum_in) / (total - inside)
    tar = mean_in / (mean_out + EPS)
    share = sum_in / (sum_all + EPS)
    zero = sum_all <= 0
    tar[zero] = float("nan")
    share[zero] = float("nan")
    return tar.float(), share.float()


def cam_shift(clean: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of the clean and triggered maps, per image (for full-image triggers)."""
    wide = wide_float(clean.device)
    return 1 - F.cosine_similarity(clean.flatten(1).to(wide), triggered.flatten(1).to(wide), dim=1, eps=EPS).float()


def summarise(values: torch.Tensor) -> dict[str, float | int | None]:
    """Mean and median over defined values; NaNs are excluded and counted."""
    values = values.detach().float().cpu()
    ok = values[~torch.isnan(values)]
    return {
        "mean": float(ok.mean()) if len(ok) else None,
        "median": float(ok.median()) if len(ok) else None,
        "count": int(len(ok)),
        "nulls": int(len(values) - len(ok)),
    }
