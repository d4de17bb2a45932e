"""Trigger families the scan reverse-engineers: what a candidate trigger is, how it is stamped, and its size.

Each family matches one kind of trigger file (DESIGN section 7) and one kind of attack:

- `patch` (kind `blend`, Neural Cleanse): x' = (1 - m) x + m p; size = |m|_1, mask pixels.
  BadNets- and Blended-like triggers.
- `additive` (kind `additive`): x' = clip(x + delta); size = RMS(delta) in grey levels (0-255).
  SIG-like signals spread thinly over the whole image, which no small mask reproduces.
- `warp` (kind `warp`): x' = grid_sample(x, identity + flow); the flow is a g x g field of control
  points upsampled bicubically to the image, as WaNet builds its warp; size = RMS displacement in pixels.
  WaNet-like warps, which move pixels instead of changing their values.

A family works on raw parameters with a leading class dimension (K, ...), so the reversal loop
(cleanse/scan/reverse.py) can stack every class into one batch; `stamp` takes the live classes' raw
parameters and a clean batch and returns the (L, B, C, H, W) stamped images, differentiable in the parameters.
Every size is measured so that a *small* value means an easy trigger, the scan's evidence of a backdoor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cleanse.attacks.trigger import Trigger, to_uint8

_EPS = 1e-12  # inside square roots: a zero trigger has a finite (zero) gradient


def _atanh(values: torch.Tensor) -> torch.Tensor:
    """The raw parameter whose (tanh + 1) / 2 is `values`."""
    return torch.atanh((2 * values - 1).clamp(-0.999, 0.999))


def _unit(raw: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(raw) + 1) / 2


@dataclass(frozen=True)
class Family(ABC):
    """The optimisation defaults every family shares; each subclass is one kind of trigger."""

    name: str
    kind: str  # the trigger file kind it writes
    size_name: str  # the per-class statistic's name in scan.json
    size_unit: str
    description: str
    lr: float = 0.1  # Adam on the raw parameters
    start_cost: float = 3e-3  # weight of the size term until the class first succeeds (then NC's schedule)
    success: float = 0.99  # attack success on the optimisation batches that counts a round as a success
    picture_labels: tuple[str, ...] = ()

    @abstractmethod
    def init(self, classes: list[int], shape: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
        """Raw parameters (K, ...) for `classes`; a class's start depends on its index and the seed only."""

    @abstractmethod
    def stamp(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """(B,C,H,W) clean images in [0,1] stamped with each of L triggers: (L,B,C,H,W)."""

    @abstractmethod
    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        """(L,) trigger sizes, differentiable."""

    @abstractmethod
    def tensors(self, params: list[torch.Tensor], shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """The trigger file's tensors for every class of `params` (leading class dimension kept)."""

    @abstractmethod
    def pictures(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (P,H,W,C) images that show one class's trigger, named by `picture_labels`."""

    def trigger(
        self, tensors: dict[str, torch.Tensor], target: int, shape: tuple[int, int, int], budget: str
    ) -> Trigger:
        return Trigger(
            kind=self.kind,
            tensors={k: v.float() for k, v in tensors.items()},
            target=target,
            input_size=shape,
            attack="neural-cleanse" if self.name == "patch" else f"scan-{self.name}",
            params={"budget": budget, "family": self.name},
            origin="scan",
            align_corners=True,
        )


@dataclass(frozen=True)
class Patch(Family):
    mask_init: float = 0.0025  # every mask pixel starts here (Neural Cleanse: uniform random), docs/commands/scan.md
    picture_labels: tuple[str, ...] = ("mask", "pattern", "mask x pattern")

    def init(self, classes: list[int], shape: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
        c, h, w = shape
        mask = _atanh(torch.full((len(classes), 1, h, w), self.mask_init))
        # Initial patterns depend on the class index only, so a one-class run starts where the batched one does.
        pattern = torch.stack(
            [_atanh(torch.rand((c, h, w), generator=torch.Generator().manual_seed(seed * 1000 + k))) for k in classes]
        )
        return [mask, pattern]

    def stamp(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        mask, pattern = _unit(params[0]), _unit(params[1])  # (L,1,H,W), (L,C,H,W)
        return (1 - mask).unsqueeze(1) * x.unsqueeze(0) + (mask * pattern).unsqueeze(1)

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        return _unit(params[0]).sum((1, 2, 3))

    def tensors(self, params: list[torch.Tensor], shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {"mask": _unit(params[0]).squeeze(1), "pattern": _unit(params[1])}

    def pictures(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        m = tensors["mask"].unsqueeze(0).expand_as(tensors["pattern"])
        return to_uint8(torch.stack([m, tensors["pattern"], m * tensors["pattern"]]) * 255).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class Additive(Family):
    picture_labels: tuple[str, ...] = ("delta (+/-, x4)", "on grey")

    def init(self, classes: list[int], shape: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
        return [torch.zeros(len(classes), *shape)]  # raw = delta in grey levels (0-255 scale)

    def stamp(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return (x.unsqueeze(0) + (params[0] / 255).unsqueeze(1)).clamp(0, 1)

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        return (params[0].square().mean((1, 2, 3)) + _EPS).sqrt()

    def tensors(self, params: list[torch.Tensor], shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {"delta": (params[0] / 255).clamp(-1, 1)}

    def pictures(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        delta = tensors["delta"]
        signed = (0.5 + 4 * delta).clamp(0, 1)  # mid grey is 0; 4x so a faint signal shows
        on_grey = (0.5 + delta).clamp(0, 1)
        return to_uint8(torch.stack([signed, on_grey]) * 255).permute(0, 2, 3, 1)


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(H, W, 2) grid_sample coordinates (x, y) of every pixel centre, align_corners=True."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=2)


@dataclass(frozen=True)
class Warp(Family):
    control: int = 4  # g x g control points (WaNet's k = 4)
    picture_labels: tuple[str, ...] = ("warped grid", "displacement (x8)")

    def init(self, classes: list[int], shape: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
        return [torch.zeros(len(classes), 2, self.control, self.control)]  # raw = control displacements in pixels

    def _flow(self, raw: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(L, H, W, 2) displacement in grid units from (L, 2, g, g) control displacements in pixels."""
        px = F.interpolate(raw, size=(height, width), mode="bicubic", align_corners=True)
        scale = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=raw.device)
        return px.permute(0, 2, 3, 1) * scale

    def stamp(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        n_live, (b, c, h, w) = len(params[0]), x.shape
        grid = (identity_grid(h, w).to(x.device) + self._flow(params[0], h, w)).clamp(-1, 1)  # (L,H,W,2)
        grids = grid.unsqueeze(1).expand(n_live, b, h, w, 2).reshape(n_live * b, h, w, 2)
        images = x.unsqueeze(0).expand(n_live, b, c, h, w).reshape(n_live * b, c, h, w)
        out = F.grid_sample(images, grids.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(n_live, b, c, h, w)

    def size(self, params: list[torch.Tensor]) -> torch.Tensor:
        raw = params[0]
        px = F.interpolate(raw, scale_factor=8, mode="bicubic", align_corners=True)  # a resolution-free measure
        return (px.square().sum(1).mean((1, 2)) + _EPS).sqrt()

    def tensors(self, params: list[torch.Tensor], shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        raw, (_, h, w) = params[0], shape
        return {"grid": (identity_grid(h, w).to(raw.device) + self._flow(raw, h, w)).clamp(-1, 1)}

    def pictures(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        grid = tensors["grid"]
        h, w = grid.shape[:2]
        lines = torch.ones(1, 3, h, w)
        lines[:, :, :: max(h // 8, 2)] = 0
        lines[:, :, :, :: max(w // 8, 2)] = 0
        warped = F.grid_sample(lines, grid.unsqueeze(0), mode="bilinear", padding_mode="border", align_corners=True)
        disp = grid - identity_grid(h, w)
        px = disp * torch.tensor([(w - 1) / 2, (h - 1) / 2])
        arrows = torch.stack([0.5 + px[..., 0] / 8 * 4, 0.5 + px[..., 1] / 8 * 4, torch.full((h, w), 0.5)])
        return to_uint8(torch.cat([warped, arrows.clamp(0, 1).unsqueeze(0)]) * 255).permute(0, 2, 3, 1)


PATCH = Patch(
    name="patch",
    kind="blend",
    size_name="mask_l1",
    size_unit="mask pixels",
    description="smallest mask + pattern (Neural Cleanse)",
)
ADDITIVE = Additive(
    name="additive",
    kind="additive",
    size_name="delta_rms",
    size_unit="grey levels RMS",
    lr=1.0,
    start_cost=1e-2,
    success=0.9,
    description="smallest full-image additive signal",
)
WARP = Warp(
    name="warp",
    kind="warp",
    size_name="warp_rms",
    size_unit="pixels RMS",
    lr=0.02,
    start_cost=1e-1,
    success=0.9,
    description="smallest smooth warp (4 x 4 control points)",
)
