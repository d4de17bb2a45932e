"""BadNets (Gu et al., 2017): a small solid patch, by default 3x3 white in the bottom-right corner."""

from __future__ import annotations

from typing import Any

import torch

from cleanse.attacks.base import Attack, load_pattern_image, register
from cleanse.attacks.trigger import Trigger
from cleanse.errors import CleanseError

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def patch_geometry(height: int, size: int, margin: int) -> tuple[int, int]:
    """The default patch scales with the image: 3 pixels and a 1-pixel margin per 32."""
    scale = height / 32
    return (size if size > 0 else max(1, round(3 * scale))), (margin if margin >= 0 else max(0, round(scale)))


@register
class BadNets(Attack):
    name = "badnets"
    summary = "solid patch (size, position, colour or an image); default 3x3 white, bottom-right"
    defaults = {"size": 0, "margin": -1, "position": "bottom-right", "color": "255", "image": ""}
    help = {
        "size": "patch side in pixels (0: 3 per 32 pixels of image height)",
        "margin": "gap to the image border (-1: 1 per 32 pixels)",
        "position": f"one of {', '.join(CORNERS)}, or ROW,COL of the patch's top-left pixel",
        "color": "one grey value 0-255 or R,G,B",
        "image": "a PNG/JPEG to use as the patch (resized to size x size)",
    }

    def make_trigger(
        self, params: dict[str, Any], channels: int, height: int, width: int, generator: torch.Generator
    ) -> Trigger:
        size, margin = patch_geometry(height, params["size"], params["margin"])
        row, col = self._position(params["position"], size, margin, height, width)
        if params["image"]:
            colour = load_pattern_image(params["image"], channels, size, size, nearest=True, what="patch")
        else:
            colour = self._colour(params["color"], channels).view(channels, 1, 1).expand(channels, size, size)
        mask = torch.zeros(height, width)
        pattern = torch.zeros(channels, height, width)
        mask[row : row + size, col : col + size] = 1
        pattern[:, row : row + size, col : col + size] = colour
        return Trigger(
            "blend",
            {"mask": mask, "pattern": pattern},
            0,
            (channels, height, width),
            self.name,
            {**params, "size": size, "margin": margin, "row": row, "col": col},
        )

    @staticmethod
    def _position(position: str, size: int, margin: int, height: int, width: int) -> tuple[int, int]:
        if position in CORNERS:
            row = height - margin - size if position.startswith("bottom") else margin
            col = width - margin - size if position.endswith("right") else margin
        else:
            try:
                row, col = (int(v) for v in position.split(","))
            except ValueError:
                raise CleanseError(
                    f"badnets position {position!r} must be one of {', '.join(CORNERS)} or ROW,COL"
                ) from None
        if row < 0 or col < 0 or row + size > height or col + size > width:
            raise CleanseError(
                f"badnets patch of size {size} at ({row},{col}) does not fit a {height}x{width} image; "
                "change size/position"
            )
        return row, col

    @staticmethod
    def _colour(text: str, channels: int) -> torch.Tensor:
        try:
            values = [int(v) for v in str(text).split(",")]
        except ValueError:
            values = []
        if len(values) not in (1, channels) or not all(0 <= v <= 255 for v in values):
            raise CleanseError(f"badnets color {text!r} must be one value 0-255 or {channels} comma-separated values")
        return torch.tensor(values * (channels if len(values) == 1 else 1), dtype=torch.float32) / 255
