"""Batched Grad-CAM on the model's device, and the Trigger Attention Ratio (TAR).

Grad-CAM (Selvaraju et al., 2017) for class c at layer activation A (N,K,h,w):
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

from cleanse.engine.trace import Hook, trace_forward
from cleanse.errors import CleanseError

EPS = 1e-8
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class LayerInfo:
    name: str
    shape: tuple[int, ...]  # (K, h, w) of the layer's output


def bare_net(model: nn.Module) -> nn.Module:
    """The architecture inside a ClassifierModel (whose layer names have no `net.` prefix), or the model itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def map_layers(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerInfo]:
    """Modules that output a 4-D map, in the order their forward calls finish (one traced forward).

    Modules called more than once per forward (a shared activation) are left out:
    their output is not one well-defined map.
    """
    calls: dict[str, int] = {}
    order: list[LayerInfo] = []
    inner = bare_net(model)

    def hook_for(name: str) -> Hook:
        def hook(mod: nn.Module, args: object, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                order.append(LayerInfo(name, tuple(out.shape[1:])))

        return hook

    device = next(model.parameters()).device
    trace_forward(
        model,
        torch.zeros(1, *input_size, device=device),
        [(module, hook_for(name)) for name, module in inner.named_modules() if name],
    )
    return [info for info in order if calls[info.name] == 1]


def default_layer(model: nn.Module, input_size: tuple[int, int, int]) -> str:
    """The last module producing a spatial (larger than 1x1) 4-D map before global pooling."""
    spatial = [i for i in map_layers(model, input_size) if i.shape[1] * i.shape[2] > 1]
    if not spatial:
        raise CleanseError("the model has no 4-D feature map to explain; pass --layer NAME")
    return spatial[-1].name


def tar_layer(model: nn.Module, input_size: tuple[int, int, int]) -> str:
    """The deepest block output at least input/8 on a side: cells no larger than a small patch trigger.

    Block outputs (the network's direct children) are preferred over modules inside a
    block: on the synthetic BadNets model, cnn's `layer2` output (7x7) separates a
    backdoored from a clean model far better than `layer3.conv1` (also 7x7, but a
    pre-pooling convolution): set TAR 19.8 vs 1.9 against 4.2 vs 1.9.
    """
    _, height, width = input_size
    fine = [i for i in map_layers(model, input_size) if i.shape[1] >= height / 8 and i.shape[2] >= width / 8]
    blocks = [i for i in fine if "." not in i.name]
    if not fine:
        raise CleanseError("the model has no 4-D feature map at least input/8 on a side; pass --layer NAME")
    return (blocks or fine)[-1].name


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    inner = bare_net(model)
    modules = dict(inner.named_modules())
    if name not in modules or not name:
        valid = [n for n in modules if n]
        shown = ", ".join(valid[-25:])
        raise CleanseError(f"unknown layer {name!r}; valid layers include: {shown}")
    return modules[name]


@contextlib.contextmanager
def capture(module: nn.Module, start_grad: bool = False) -> Iterator[list[torch.Tensor]]:
    """Record the module's output on every forward; the hook is always removed.

    With `start_grad`, the output is replaced by a detached leaf that requires grad and
    autograd is switched on from there: run the forward under torch.no_grad() and only
    the part of the network after the layer is recorded for the backward pass.
    """
    store: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor | None:
        if start_grad:
            out = out.detach().requires_grad_(True)
            torch.set_grad_enabled(True)
        store.append(out)
        return out if start_grad else None

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
    module = resolve_layer(model, layer)
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
            classes = logits.argmax(1) if target is None else target.to(logits.device)
            score = logits.gather(1, classes.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, activation)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation.detach()).sum(1, keepdim=True))
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
    a = cams.flatten(1).double()
    mf = m.flatten().double()
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
    return 1 - F.cosine_similarity(clean.flatten(1).double(), triggered.flatten(1).double(), dim=1, eps=EPS).float()


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
