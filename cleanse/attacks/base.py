"""The attack interface and its registry.

An attack turns typed parameters into a Trigger; `poison_dataset` (in
cleanse.attacks.poison) decides which rows carry it. Attacks that need more
(SIG's clean-label selection, WaNet's noise rows) say so through the hooks here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from cleanse.attacks.trigger import Trigger
from cleanse.errors import CleanseError
from cleanse.registry import Registry


class Attack(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    clean_label: ClassVar[bool] = False  # poison only target-class rows and keep their labels
    defaults: ClassVar[dict[str, Any]] = {}
    help: ClassVar[dict[str, str]] = {}

    def parse_params(self, raw: dict[str, str]) -> dict[str, Any]:
        unknown = sorted(set(raw) - set(self.defaults))
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise CleanseError(f"attack {self.name} has no parameter {unknown[0]!r}; its parameters are: {known}")
        params = dict(self.defaults)
        for key, value in raw.items():
            default = self.defaults[key]
            try:
                if isinstance(default, bool):
                    params[key] = value.lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    params[key] = int(value)
                elif isinstance(default, float):
                    params[key] = float(value)
                else:
                    params[key] = value
            except ValueError:
                raise CleanseError(
                    f"attack {self.name} parameter {key}={value!r} is not a valid {type(default).__name__}"
                ) from None
        return params

    @abstractmethod
    def make_trigger(
        self, params: dict[str, Any], channels: int, height: int, width: int, generator: torch.Generator
    ) -> Trigger:
        """Build the trigger (its target is filled in by poison_dataset)."""

    def noise_rows(self, images: torch.Tensor, trigger: Trigger, generator: torch.Generator) -> torch.Tensor:
        """Training-time extra rows for the attack (WaNet's noise mode); none by default."""
        return images


def load_pattern_image(path: str, channels: int, height: int, width: int, nearest: bool, what: str) -> torch.Tensor:
    """A user's PNG/JPEG as a (C,H,W) pattern in [0,1], resized to (height, width)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(
                im.convert("RGB").resize(
                    (width, height), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
                )
            )
    except Exception:
        raise CleanseError(f"{path}: cannot read the {what} image; pass a PNG or JPEG file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float()[:channels] / 255


ATTACKS: Registry[Attack] = Registry("attack")


def register(cls: type[Attack]) -> type[Attack]:
    ATTACKS.register(cls.name)(cls())
    return cls
