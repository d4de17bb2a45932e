"""The dataset: one uint8 image tensor plus labels, and its safetensors file format.

A dataset file's images are a copy-on-write memory map of the file (read by index, never loaded whole), so a
dataset larger than memory works as long as each step touches only the rows it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cleanse.errors import CleanseError
from cleanse.files import RowSource, write_safetensors_streamed
from cleanse.formats import FileFormat

DATASET_FILE = FileFormat(
    "cleanse.dataset",
    1,
    wrong_format="{path}: this is a {found} file, not a dataset; pass a dataset file or folder as DATA",
    wrong_version="{path}: dataset format version {version} is not supported (this cleanse reads {supported}); "
    "re-create it",
)


@dataclass
class Dataset:
    """Images as uint8 (N, H, W, C) and int64 labels; poisoned sets also carry ground truth."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str = ""
    poisoned: torch.Tensor | None = None
    original_labels: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings the CLI shows the user

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise CleanseError(
                f"{self.source}: images must be uint8 (N, H, W, C), got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if min(self.images.shape[1:]) < 1:
            raise CleanseError(
                f"{self.source}: images must be at least 1x1 with at least one channel, "
                f"got shape {tuple(self.images.shape)}"
            )
        if self.labels.shape != (len(self.images),):
            raise CleanseError(
                f"{self.source}: {len(self.labels)} labels for {len(self.images)} images; the data is inconsistent"
            )
        self.labels = self.labels.long()
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise CleanseError(
                f"{self.source}: labels must lie in 0..{len(self.classes) - 1}; "
                f"found {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def suspicious_mask(self) -> torch.Tensor:
        """Rows known to be poisoned or WaNet noise rows (all False for clean data)."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        for column in (self.poisoned, self.noise):
            if column is not None:
                mask |= column
        return mask

    def subset(self, index: torch.Tensor) -> Dataset:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Dataset(
            self.images[index],
            self.labels[index],
            list(self.classes),
            self.source,
            pick(self.poisoned),
            pick(self.original_labels),
            pick(self.noise),
            dict(self.meta),
            list(self.notes),
        )

    def chw_float(self, index: torch.Tensor | slice | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images in [0, 1], (N, C, H, W)."""
        images = self.images if index is None else self.images[index]
        return images.to(device).permute(0, 3, 1, 2).float().div_(255)


def save_dataset(dataset: Dataset, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor | RowSource] = {"images": dataset.images, "labels": dataset.labels}
    for name in ("poisoned", "original_labels", "noise"):
        value = getattr(dataset, name)
        if value is not None:
            tensors[name] = value
    write_dataset_tensors(path, tensors, dataset.classes, dataset.meta)


def write_dataset_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor | RowSource], classes: list[str], meta: dict[str, Any]
) -> None:
    """A dataset file from its tensors (images may be a row source, computed a block at a time), streamed."""
    write_safetensors_streamed(path, tensors, {**DATASET_FILE.header(), "classes": classes, **meta})


def load_dataset_file(path: str | Path) -> Dataset:
    path = Path(path)
    tensors, doc = DATASET_FILE.read_or_raw(path, mapped=("images",))
    if doc is None:
        if "images" in tensors and "labels" in tensors:
            raise CleanseError(
                f"{path}: dataset file has no 'cleanse' metadata (class names); "
                "write it with cleanse poison or pass an .npz"
            )
        raise CleanseError(
            f"{path}: not a cleanse dataset file (no 'images'/'labels' tensors); "
            "pass a dataset written by cleanse poison"
        )
    classes = doc.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise CleanseError(
            f"{path}: dataset metadata 'classes' must be a non-empty list of names; "
            "re-create the file with cleanse poison"
        )
    for name, dtype in (
        ("images", torch.uint8),
        ("labels", torch.int64),
        ("poisoned", torch.bool),
        ("original_labels", torch.int64),
        ("noise", torch.bool),
    ):
        if name in tensors and tensors[name].dtype != dtype:
            raise CleanseError(
                f"{path}: tensor {name!r} must be {dtype}, found {tensors[name].dtype}; "
                "re-create the file with cleanse poison"
            )
    if "images" not in tensors or "labels" not in tensors:
        raise CleanseError(f"{path}: dataset file lacks 'images' or 'labels'; re-create it with cleanse poison")
    if tensors["images"].dim() != 4 or tensors["images"].shape[-1] != 3:
        raise CleanseError(
            f"{path}: images must have 3 channels (uint8 N,H,W,3), got shape {tuple(tensors['images'].shape)}; "
            "re-create the file with cleanse poison"
        )
    n = len(tensors["images"])
    for name in ("poisoned", "original_labels", "noise"):
        if name in tensors and tensors[name].shape != (n,):
            raise CleanseError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected ({n},); the file is damaged"
            )
    meta = {k: v for k, v in doc.items() if k not in ("format", "format_version", "classes")}
    return Dataset(
        tensors["images"],
        tensors["labels"],
        classes,
        str(path),
        tensors.get("poisoned"),
        tensors.get("original_labels"),
        tensors.get("noise"),
        meta,
    )
