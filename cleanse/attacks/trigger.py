"""Trigger files and trigger application, shared by `poison`, the metrics and every recipe.

Kinds (DESIGN section 7):
- `blend`:    x' = (1 - m) * x + m * p          (mask (H,W), pattern (C,H,W), both in [0,1])
- `additive`: x' = clip(x + delta)               (delta (C,H,W) in [0,1] pixel units)
- `warp`:     x' = grid_sample(x, grid)          (grid (H,W,2), align_corners recorded)

Triggered evaluation images come from the same uint8 -> uint8 application that
`poison` uses (computed in float on the 0..255 scale, rounded half to even), so
evaluation matches the poisoned training data exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cleanse.errors import CleanseError
from cleanse.files import write_safetensors
from cleanse.formats import FileFormat

_GET_ONE = "pass the .trigger.safetensors from cleanse poison or a trigger-<class>.safetensors from cleanse scan"
TRIGGER_FILE = FileFormat(
    "cleanse.trigger",
    1,
    wrong_format="{path}: not a trigger file (a {found} file); " + _GET_ONE,
    wrong_version="{path}: trigger format version {version} is not supported; re-create it",
    no_metadata="{path}: not a trigger file (no 'cleanse' metadata); " + _GET_ONE,
)
KIND_TENSORS = {"blend": ("mask", "pattern"), "additive": ("delta",), "warp": ("grid",)}
ALL_TO_ALL = {"all_to_all": {"shift": 1}}
_CHUNK = 4096


# Triggers compute in float32 with a few temporaries, so the rows triggered at once are bounded by their float32 size
# as well as by a row cap: at 32 px the caps as before, at 224 px 111 rows (1,024 rows' temporaries took 2 GB).
TRIGGER_CHUNK_BYTES = 64 * 2**20


def rows_at_once(image_shape: tuple[int, ...], cap: int) -> int:
    """Rows of shape (H, W, C) to trigger at once: at most `cap`, and at most TRIGGER_CHUNK_BYTES of float32."""
    return max(1, min(cap, TRIGGER_CHUNK_BYTES // (4 * math.prod(image_shape))))


@dataclass
class Trigger:
    kind: str
    tensors: dict[str, torch.Tensor]
    target: int | dict
    input_size: tuple[int, int, int]  # (C, H, W)
    attack: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)
    origin: str = "poison"
    align_corners: bool = True
    region: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- targets ---------------------------------------------------------
    @property
    def all_to_all(self) -> bool:
        return isinstance(self.target, dict)

    @property
    def shift(self) -> int:
        return int(self.target["all_to_all"]["shift"]) if isinstance(self.target, dict) else 0

    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        if isinstance(self.target, dict):
            return (labels + self.shift) % num_classes
        return torch.full_like(labels, int(self.target))

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Rows whose triggered copies count for ASR/RA: true class is not the target."""
        if isinstance(self.target, dict):
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != int(self.target)

    def describe_target(self) -> str:
        return f"all-to-all (y+{self.shift})" if self.all_to_all else f"class {self.target}"

    # -- application -------------------------------------------------------
    def check_size(self, channels: int, height: int, width: int, what: str = "the images") -> None:
        if tuple(self.input_size) != (channels, height, width):
            c, h, w = self.input_size
            raise CleanseError(
                f"trigger was made for {c}x{h}x{w} images but {what} are {channels}x{height}x{width}; "
                "use a trigger for this image size (cleanse poison at this size, or cleanse scan on this model)"
            )

    def check_classes(self, num_classes: int) -> None:
        if isinstance(self.target, int) and not 0 <= self.target < num_classes:
            raise CleanseError(
                f"the trigger targets class {self.target} but the model has classes 0..{num_classes - 1}; "
                "use a trigger made for this model"
            )

    def apply(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Apply to float images (N,C,H,W) in [0, scale]; differentiable in the trigger tensors."""
        t = {k: v.to(x.device, x.dtype) for k, v in self.tensors.items()}
        if self.kind == "blend":
            m = t["mask"]
            return (1 - m) * x + m * (t["pattern"] * scale)
        if self.kind == "additive":
            return (x + t["delta"] * scale).clamp(0, scale)
        if self.kind == "warp":
            grid = t["grid"].unsqueeze(0).expand(len(x), -1, -1, -1)
            return warp(x, grid, self.align_corners)
        raise CleanseError(f"unknown trigger kind {self.kind!r}")

    def apply_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W,C) -> uint8 (N,H,W,C), exactly as `poison` writes poisoned rows."""
        self.check_size(images.shape[3], images.shape[1], images.shape[2])
        out = torch.empty_like(images)
        chunk = rows_at_once(tuple(images.shape[1:]), _CHUNK)  # float copies of a chunk: fewer rows for large images
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk].permute(0, 3, 1, 2).float()
            y = self.apply(x, scale=255.0)
            out[start : start + chunk] = to_uint8(y).permute(0, 2, 3, 1)
        return out

    def region_mask(self) -> torch.Tensor | None:
        """The trigger region M used by TAR: `region`, else mask > 0.5, else None."""
        if self.region is not None:
            return self.region.bool()
        if self.kind == "blend":
            return self.tensors["mask"] > 0.5
        return None

    # -- files -------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        doc = {
            **TRIGGER_FILE.header(),
            "kind": self.kind,
            "attack": self.attack,
            "params": self.params,
            "target": self.target,
            "input_size": list(self.input_size),
            "origin": self.origin,
            **self.extra,
        }
        if self.kind == "warp":
            doc["align_corners"] = self.align_corners
        return doc

    def save(self, path: str | Path) -> None:
        tensors = {k: v.float() for k, v in self.tensors.items()}
        if self.region is not None:
            tensors["region"] = self.region.bool()
        write_safetensors(path, tensors, self.metadata())


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float on the 0..255 scale -> uint8, rounding half to even."""
    return torch.round(x).clamp_(0, 255).to(torch.uint8)


def warp(x: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=align_corners)


def parse_target(value: Any, num_classes: int | None = None) -> int | dict:
    if isinstance(value, dict):
        try:
            shift = value["all_to_all"]["shift"]
            if isinstance(shift, bool) or not isinstance(shift, int) or not -(2**31) <= shift < 2**31:
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CleanseError(f"trigger target {value!r} is malformed; expected an int or {ALL_TO_ALL}") from None
        return {"all_to_all": {"shift": shift}}
    if isinstance(value, str) and value.strip().lower() == "all":
        return dict(ALL_TO_ALL)
    try:
        if isinstance(value, (float, bool)):
            raise ValueError
        target = int(value)
    except (TypeError, ValueError, OverflowError):
        raise CleanseError(f"target {value!r} is not a class index; pass an integer class index or 'all'") from None
    if target < 0 or (num_classes is not None and target >= num_classes):
        raise CleanseError(f"target {target} is out of range; the data has classes 0..{(num_classes or 1) - 1}")
    return target


def load_trigger(path: str | Path) -> Trigger:
    path = Path(path)
    tensors, doc = TRIGGER_FILE.read(path)
    return trigger_from_contents(tensors, doc, path)


def trigger_from_contents(tensors: dict[str, torch.Tensor], doc: dict[str, Any] | None, path: str | Path) -> Trigger:
    """Validate a trigger file's tensors and `cleanse` metadata; anything malformed is a CleanseError."""
    doc = TRIGGER_FILE.check(doc, path)
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in KIND_TENSORS:
        raise CleanseError(f"{path}: trigger kind {kind!r} is unknown; expected one of {', '.join(KIND_TENSORS)}")
    size = doc.get("input_size")
    if not (
        isinstance(size, list)
        and len(size) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise CleanseError(f"{path}: trigger metadata 'input_size' must be [C, H, W]; re-create the file")
    c, h, w = size
    expected = {"mask": (h, w), "pattern": (c, h, w), "delta": (c, h, w), "grid": (h, w, 2)}
    for name in KIND_TENSORS[kind]:
        if name not in tensors:
            raise CleanseError(f"{path}: a {kind} trigger needs a {name!r} tensor; the file is incomplete")
        t = tensors[name]
        if tuple(t.shape) != expected[name]:
            raise CleanseError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {expected[name]} for input_size {size}"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CleanseError(f"{path}: tensor {name!r} must be finite floats; the file is damaged")
        if name in ("mask", "pattern") and (t.min() < 0 or t.max() > 1):
            raise CleanseError(f"{path}: tensor {name!r} must lie in [0, 1]; the file is damaged")
    region = tensors.get("region")
    if region is not None and tuple(region.shape) != (h, w):
        raise CleanseError(f"{path}: 'region' has shape {tuple(region.shape)}, expected {(h, w)}")
    origin = doc.get("origin", "poison")
    if origin not in ("poison", "scan"):
        raise CleanseError(f"{path}: trigger origin {origin!r} must be 'poison' or 'scan'")
    known = {"format", "format_version", "kind", "attack", "params", "target", "input_size", "origin", "align_corners"}
    params = doc.get("params")
    return Trigger(
        kind=kind,
        tensors={k: tensors[k].float() for k in KIND_TENSORS[kind]},
        target=parse_target(doc.get("target")),
        input_size=(c, h, w),
        attack=str(doc.get("attack", "custom")),
        params=params if isinstance(params, dict) else {},
        origin=origin,
        align_corners=bool(doc.get("align_corners", True)),
        region=None if region is None else region.bool(),
        extra={k: v for k, v in doc.items() if k not in known},
    )
