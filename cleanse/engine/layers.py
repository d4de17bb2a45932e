"""Which layers Grad-CAM can explain, how their outputs map onto the image, and the default layers.

A layer's output is a *feature map* when it lies on a grid over the input image, in one of three layouts:

    nchw    (B, C, h, w)   convolutional maps (the PyTorch convention; wins when a shape reads both ways)
    nhwc    (B, h, w, C)   channels-last maps: Swin blocks, the inside of ConvNeXt blocks
    tokens  (B, P + h*w, C) transformer tokens: P prefix tokens (class, distillation, register) then the patch
                           grid row by row, as in torchvision and timm ViTs

A 4-D shape is read as (h, w) = its last two dims when their aspect ratio is within 1.5x of the input's, else as the
middle two when those are; a 3-D shape (B, N, C) is a token sequence when N = P + h*w for a grid (h, w) = (H/s,
W/s), both rounded down or both up, for a stride s, and 0 <= P <= 16 prefix tokens (the smallest P wins). The grid
can be given instead: `--layer NAME@14x14` reads NAME's tokens on a 14x14 grid after N - 196 prefix tokens. A module
returning a tuple (an attention block returning (output, weights), a HuggingFace layer returning (hidden_states,))
is read through its first item.

The default layers follow from one traced forward and backward pass (`probe_layers`), never from module names:
a *candidate* is a feature map larger than 1x1, produced by a module called once per forward, through which
a random projection of the classifier head's input has a non-zero gradient at some grid cell. In a ViT that
reads its class token the patch tokens of the last block's output (and of its MLP) have no gradient, so the
rules land on the output of the block before it: the input of the last block, which pytorch-grad-cam's
documentation advises for ViTs (`blocks[-1].norm1` normalises exactly that).

- explain's picture layer (`default_layer`): the deepest *block output* among the candidates, else the deepest
  candidate. A block output is a direct child of the network or a member of a stack (a Sequential or ModuleList
  whose children all have one class: ResNet stages, ViT encoder layers, Swin and ConvNeXt stages).
- the TAR layer (`tar_layer`): the same among candidates at least input/8 on a side (if none is, those with
  the finest grid the model has: a ViT's whole token grid).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from cleanse.engine.trace import Hook
from cleanse.errors import CleanseError

MAX_PREFIX_TOKENS = 16
ASPECT_TOLERANCE = 1.5
SHOWN_LAYERS = 30
_GRID = re.compile(r"^(?P<name>[^@]+)@(?P<h>[0-9]+)x(?P<w>[0-9]+)$")


@dataclass(frozen=True)
class Layout:
    """How one layer's output lies on the image grid."""

    kind: str  # "nchw" | "nhwc" | "tokens"
    grid: tuple[int, int]  # (h, w)
    channels: int
    prefix: int = 0  # tokens before the patch grid (tokens layout only)

    def to_map(self, t: torch.Tensor) -> torch.Tensor:
        """The (B, C, h, w) view of an output (or of its gradient) in this layout."""
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        h, w = self.grid
        return t[:, self.prefix :, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        h, w = self.grid
        if self.kind == "tokens":
            return f"{h}x{w} token grid after {self.prefix} prefix token{'s' if self.prefix != 1 else ''}"
        return f"{h}x{w} {self.kind} map"


def parse_layer(spec: str) -> tuple[str, tuple[int, int] | None]:
    """`NAME` or `NAME@HxW` (a token grid given) -> (module name, grid or None)."""
    found = _GRID.match(spec)
    if found is None:
        return spec, None
    grid = (int(found["h"]), int(found["w"]))
    if min(grid) < 1:
        raise CleanseError(f"--layer {spec!r}: the grid after @ must be positive, e.g. NAME@14x14")
    return found["name"], grid


def _on_grid(h: int, w: int, height: int, width: int) -> bool:
    """(h, w) is a plausible grid over a (height, width) image: no larger, with a similar aspect ratio."""
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    return abs(math.log((h / w) / (height / width))) <= math.log(ASPECT_TOLERANCE)


def _token_grid(n: int, height: int, width: int) -> tuple[tuple[int, int], int] | None:
    """The (grid, prefix) reading of n tokens with the fewest prefix tokens, or None.

    The grid is (H/s, W/s) for a stride s, both rounded the same way (down, or up for padded inputs), so a square
    image always has a square grid.
    """
    best: tuple[tuple[int, int], int] | None = None
    for stride in range(1, max(height, width) + 1):
        for h, w in {(height // stride, width // stride), (-(-height // stride), -(-width // stride))}:
            extra = n - h * w
            if h >= 1 and w >= 1 and 0 <= extra <= MAX_PREFIX_TOKENS and (best is None or extra < best[1]):
                best = ((h, w), extra)
    return best


def infer_layout(
    shape: tuple[int, ...] | torch.Size, image: tuple[int, int], grid: tuple[int, int] | None = None
) -> Layout | None:
    """The layout of an output of `shape` (batch first) for images of size `image` (H, W); None if not a map."""
    height, width = image
    dims = tuple(shape[1:])
    if len(dims) == 3:
        a, b, c = dims
        if grid is not None:
            readings = [Layout("nchw", (b, c), a), Layout("nhwc", (a, b), c)]
            return next((r for r in readings if r.grid == grid), None)
        if _on_grid(b, c, height, width):
            return Layout("nchw", (b, c), a)
        if _on_grid(a, b, height, width):
            return Layout("nhwc", (a, b), c)
        return None
    if len(dims) == 2:
        n, channels = dims
        if grid is not None:
            extra = n - grid[0] * grid[1]
            return Layout("tokens", grid, channels, extra) if extra >= 0 else None
        found = _token_grid(n, height, width)
        return None if found is None else Layout("tokens", found[0], channels, found[1])
    return None


def first_tensor(out: object) -> torch.Tensor | None:
    """A module's output as a tensor: itself, or the first item of a tuple/list output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def bare_net(model: nn.Module) -> nn.Module:
    """The architecture inside a ClassifierModel (whose layer names have no `net.` prefix), or the model itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


@dataclass(frozen=True)
class LayerInfo:
    name: str
    layout: Layout
    reach: float  # share of grid cells where the predicted logit's gradient is non-zero
    block: bool  # a direct child of the network or a member of a stack

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid


def _block_names(net: nn.Module) -> set[str]:
    names = {name for name, _ in net.named_children()}
    for parent, module in net.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            children = list(module.named_children())
            if children and len({type(child) for _, child in children}) == 1:
                names.update(f"{parent}.{name}" if parent else name for name, _ in children)
    return names


def probe_layers(
    model: nn.Module, input_size: tuple[int, int, int], grids: dict[str, tuple[int, int]] | None = None
) -> list[LayerInfo]:
    """Every module whose output is a feature map, in the order their forwards finish, with its gradient reach.

    One forward and backward pass of two random images in eval mode; parameter .grad buffers, BatchNorm statistics
    and the training mode are left as they were. Modules called more than once per forward are left out: their
    output is not one well-defined map. `grids` reads the named layers on the given grids.
    """
    grids = grids or {}
    _, height, width = input_size
    inner = bare_net(model)
    calls: dict[str, int] = {}
    seen: list[tuple[str, torch.Tensor, Layout]] = []

    flat_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of modules with 2-D in and out

    def hook_for(name: str) -> Hook:
        def hook(mod: nn.Module, args: object, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            t = first_tensor(out)
            layout = infer_layout(t.shape, (height, width), grids.get(name)) if t is not None else None
            if t is not None and layout is not None and t.requires_grad:
                seen.append((name, t, layout))
            first = first_tensor(args)
            if t is not None and t.dim() == 2 and first is not None and first.dim() == 2:
                flat_inputs.append((first, t))

        return hook

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(2, *input_size, device=device, generator=generator).requires_grad_(True)
    handles = [m.register_forward_hook(hook_for(n)) for n, m in inner.named_modules() if n]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            score = _probe_score(logits, flat_inputs, generator)
            grads = torch.autograd.grad(score, [t for _, t, _ in seen], allow_unused=True) if seen else ()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    blocks = _block_names(inner)
    infos = []
    for (name, _, layout), g in zip(seen, grads, strict=True):
        if calls[name] != 1:
            continue
        reach = 0.0 if g is None else float((layout.to_map(g).abs().sum((0, 1)) > 0).float().mean())
        infos.append(LayerInfo(name, layout, reach, name in blocks))
    return infos


def _probe_score(
    logits: torch.Tensor, flat_inputs: list[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator
) -> torch.Tensor:
    """What the probe differentiates: a random projection of the classifier head's input when the head is found
    (the module whose output is the logits), else the predicted logits.

    The head's input rather than the logits, because some initialisations (torchvision's ViT) zero the head, which
    would make every gradient of an untrained model zero.
    """
    head_input = next((inp for inp, out in flat_inputs if out is logits and inp.requires_grad), None)
    if head_input is None:
        return logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    weights = torch.randn(head_input.shape, device=head_input.device, generator=generator, dtype=head_input.dtype)
    return (head_input * weights).sum()


def candidates(infos: list[LayerInfo]) -> list[LayerInfo]:
    """Layers Grad-CAM can explain: a map larger than 1x1 that the predicted logit has a gradient on."""
    return [i for i in infos if i.reach > 0 and i.grid[0] * i.grid[1] > 1]


def _no_map(model: nn.Module) -> CleanseError:
    return CleanseError(
        f"the model ({type(bare_net(model)).__name__}) has no feature map Grad-CAM can explain (a conv map, a "
        "channels-last map or a token grid that reaches the output); pass --layer NAME"
    )


def _deepest(found: list[LayerInfo]) -> str:
    blocks = [i for i in found if i.block]
    return (blocks or found)[-1].name


def default_layers(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[str, str]:
    """(picture layer, TAR layer) from one probe; a CleanseError when the model has no candidate."""
    found = candidates(probe_layers(model, input_size))
    if not found:
        raise _no_map(model)
    return _deepest(found), _tar_of(found, input_size)


def default_layer(model: nn.Module, input_size: tuple[int, int, int]) -> str:
    """explain's picture layer: the deepest block output among the candidates, else the deepest candidate."""
    return default_layers(model, input_size)[0]


def _tar_of(found: list[LayerInfo], input_size: tuple[int, int, int]) -> str:
    _, height, width = input_size
    fine = [i for i in found if i.grid[0] >= height / 8 and i.grid[1] >= width / 8]
    if not fine:
        finest = max(i.grid[0] * i.grid[1] for i in found)
        fine = [i for i in found if i.grid[0] * i.grid[1] == finest]
    return _deepest(fine)


def find_tar_layer(model: nn.Module, input_size: tuple[int, int, int]) -> str | None:
    """The TAR layer by the module's rule, or None when the model has no candidate."""
    found = candidates(probe_layers(model, input_size))
    return _tar_of(found, input_size) if found else None


def tar_layer(model: nn.Module, input_size: tuple[int, int, int]) -> str:
    """The TAR layer; a CleanseError when the model has none."""
    name = find_tar_layer(model, input_size)
    if name is None:
        raise _no_map(model)
    return name


def _listing(infos: list[LayerInfo]) -> str:
    names = [i.name for i in candidates(infos)]
    if not names:
        return "the model has none"
    shown = names[-SHOWN_LAYERS:]
    return ("..., " if len(names) > len(shown) else "") + ", ".join(shown)


def check_layer(model: nn.Module, spec: str, input_size: tuple[int, int, int]) -> Layout:
    """Validate a --layer value before any work: it names a module whose output is an explainable feature map."""
    name, grid = parse_layer(spec)
    modules = dict(bare_net(model).named_modules())
    infos = probe_layers(model, input_size, {name: grid} if grid is not None else None)
    if not name or name not in modules:
        raise CleanseError(f"unknown layer {name!r}; layers Grad-CAM can use (deepest last): {_listing(infos)}")
    info = next((i for i in infos if i.name == name), None)
    if info is None:
        what = f"a {grid[0]}x{grid[1]} grid" if grid else "the image grid"
        raise CleanseError(
            f"layer {name!r} does not output a feature map on {what} (or runs more than once per forward); "
            f"layers Grad-CAM can use (deepest last): {_listing(infos)}"
        )
    if info.reach == 0:
        raise CleanseError(
            f"layer {name!r} has no gradient from the prediction at any grid cell (its maps would be blank); "
            f"choose an earlier layer: {_listing(infos)}"
        )
    return info.layout


def resolve_layer(model: nn.Module, spec: str) -> nn.Module:
    """The module a --layer value names (a grid suffix is ignored here)."""
    name, _ = parse_layer(spec)
    modules = dict(bare_net(model).named_modules())
    if not name or name not in modules:
        valid = [n for n in modules if n]
        raise CleanseError(f"unknown layer {name!r}; valid layers include: {', '.join(valid[-25:])}")
    return modules[name]
