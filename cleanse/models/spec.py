"""What a model is, as a checkpoint's `cleanse` metadata records it, and what the user said about it.

ModelSpec is the metadata document (architecture and its arguments, classes, input size, normalisation,
provenance); `parse_model_metadata` validates a document from a file; ModelOptions holds the command
line's view of a model, used for raw state dicts and checked against metadata.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleanse.errors import CleanseError
from cleanse.formats import FileFormat
from cleanse.version import __version__

MODEL_FILE = FileFormat(
    "cleanse.model",
    1,
    wrong_format="{path}: this is a {found} file, not a model checkpoint; pass a model file",
    wrong_version="{path}: checkpoint format version {version} is not supported (this cleanse reads {supported})",
)
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
# how data of another size is fitted to the input: the names cleanse/data/preprocess.py implements (models sits
# below data in the import layering, so the list is repeated here; a test keeps the two equal)
PREPROCESSING = ("resize", "center-crop")
MAX_INPUT_PIXELS = 50_000_000  # the ImageFolder decompression-bomb limit: no model input may be larger
MAX_CHANNELS = 64


@dataclass
class ModelSpec:
    """Everything needed to rebuild and use a model, as stored in the checkpoint metadata."""

    arch: str
    num_classes: int
    classes: list[str]
    input_size: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    arch_args: dict[str, Any] = field(default_factory=dict)
    arch_file_sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # how data of another size is fitted to input_size (cleanse/data/preprocess.py); older files: "resize"
    preprocess: str = "resize"

    def to_metadata(self) -> dict[str, Any]:
        arch: dict[str, Any] = {"name": self.arch, "args": self.arch_args}
        if self.arch_file_sha256:
            arch["file_sha256"] = self.arch_file_sha256
        return {
            **MODEL_FILE.header(),
            "cleanse_version": __version__,
            "arch": arch,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "input_size": list(self.input_size),
            "normalization": {"mean": self.mean, "std": self.std},
            "preprocess": self.preprocess,
            "provenance": self.provenance,
        }


@dataclass
class ModelOptions:
    """What the user said on the command line about a model (for raw state dicts, or to check metadata)."""

    arch: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    classes: list[str] | None = None
    arch_args: dict[str, Any] | None = None  # --arch-arg NAME=VALUE, already typed
    preprocess: str | None = None  # --preprocess resize|center-crop


def _check_list(value: Any, kind: type | tuple[type, ...], length: int | None, what: str, path: Path) -> list:
    if (
        not isinstance(value, list)
        or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        or (length is not None and len(value) != length)
    ):
        raise CleanseError(f"{path}: metadata {what} is malformed; re-create the checkpoint with cleanse")
    if kind is not str and not all(math.isfinite(v) for v in value):
        raise CleanseError(f"{path}: metadata {what} is malformed (not finite); re-create the checkpoint with cleanse")
    return value


def _check_input_size(size: list[int], path: Path) -> None:
    c, h, w = size
    if not (1 <= c <= MAX_CHANNELS and h >= 1 and w >= 1 and h * w <= MAX_INPUT_PIXELS):
        raise CleanseError(
            f"{path}: metadata 'input_size' is malformed ({size}: C,H,W must be positive with at most "
            f"{MAX_INPUT_PIXELS} pixels); re-create the checkpoint with cleanse"
        )


def parse_model_metadata(doc: dict[str, Any], path: str | os.PathLike) -> ModelSpec:
    """The ModelSpec a checkpoint's `cleanse` metadata describes; anything malformed is a CleanseError."""
    path = Path(path)
    MODEL_FILE.check(doc, path)
    arch = doc.get("arch")
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("name"), str)
        or not isinstance(arch.get("args", {}), dict)
    ):
        raise CleanseError(
            f"{path}: metadata 'arch' must be {{'name': str, 'args': {{...}}}}; re-create the checkpoint with cleanse"
        )
    num_classes = doc.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CleanseError(
            f"{path}: metadata 'num_classes' must be a positive integer; re-create the checkpoint with cleanse"
        )
    size = _check_list(doc.get("input_size"), int, 3, "'input_size'", path)
    _check_input_size(size, path)
    norm = doc.get("normalization")
    if not isinstance(norm, dict):
        raise CleanseError(f"{path}: metadata 'normalization' is missing; re-create the checkpoint with cleanse")
    mean = [float(v) for v in _check_list(norm.get("mean"), (int, float), size[0], "'normalization.mean'", path)]
    std = [float(v) for v in _check_list(norm.get("std"), (int, float), size[0], "'normalization.std'", path)]
    if any(s <= 0 for s in std):
        raise CleanseError(f"{path}: metadata normalization std must be positive")
    classes = _check_list(doc.get("classes"), str, num_classes, "'classes'", path)
    given = doc.get("provenance")
    provenance = given if isinstance(given, dict) else {}
    preprocess = doc.get("preprocess", "resize")
    if preprocess not in PREPROCESSING:
        raise CleanseError(
            f"{path}: metadata 'preprocess' must be one of {', '.join(PREPROCESSING)}; "
            "re-create the checkpoint with cleanse"
        )
    return ModelSpec(
        arch["name"],
        num_classes,
        classes,
        (size[0], size[1], size[2]),
        mean,
        std,
        dict(arch.get("args", {})),
        arch.get("file_sha256"),
        provenance,
        preprocess,
    )
