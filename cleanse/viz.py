"""Small image helpers: grids of uint8 images, optionally labelled, written as PNG."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 12  # pixels, when Pillow can scale its built-in font; the bitmap fallback is about 11 px high
PAD = 4  # white pixels around label text
HEADING_LINES, TITLE_LINES = 3, 2  # at most this many lines; the rest is cut with "..."
ELLIPSIS = "..."  # ASCII: the built-in fonts have no single-character ellipsis


def image_grid(
    rows: list[torch.Tensor],
    scale: int = 4,
    gap: int = 2,
    *,
    col_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """Lay out rows of uint8 (N,H,W,C) images, scaled up with nearest-neighbour, on a white sheet.

    `col_labels` head the columns, `row_labels` fill a left margin (one per row, "\\n" starts a line), `title`
    goes on top. Text is word-wrapped to its cell and cut with "..." where it still does not fit, so labels never
    reach a neighbour's space. Without labels the sheet is the bare grid.
    """
    grid = _grid(rows, scale, gap)
    if col_labels is None and row_labels is None and title is None:
        return Image.fromarray(grid)
    n, cell_h, cell_w = max(len(r) for r in rows), rows[0].shape[1] * scale, rows[0].shape[2] * scale
    if len(col_labels or []) > n or len(row_labels or []) > len(rows):
        raise ValueError(
            f"{len(col_labels or [])} column and {len(row_labels or [])} row labels for a {len(rows)}x{n} grid"
        )
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # for measuring only

    def width(text: str) -> int:
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        return int(right - left)

    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    heads = [_fit(t, lambda s: width(s) <= cell_w - 2, HEADING_LINES) for t in col_labels or []]
    head_h = max((len(h) for h in heads), default=0) * line_h + PAD if col_labels is not None else 0
    margin = 0
    if row_labels is not None:
        natural = max((width(line) for t in row_labels for line in t.split("\n")), default=0)
        margin = min(natural, max(cell_w, 120)) + 2 * PAD
    sides = [_fit(t, lambda s: width(s) <= margin - 2 * PAD, max(1, cell_h // line_h)) for t in row_labels or []]
    total_w = margin + grid.shape[1]
    titles = _fit(title, lambda s: width(s) <= total_w - 2 * PAD, TITLE_LINES) if title is not None else []
    title_h = len(titles) * line_h + PAD if title is not None else 0

    sheet = Image.new("RGB", (total_w, title_h + head_h + grid.shape[0]), "white")
    sheet.paste(Image.fromarray(grid), (margin, title_h + head_h))
    pen = ImageDraw.Draw(sheet)

    def write(lines: list[str], x: int, y: int, box_w: int | None = None) -> None:
        """Lines from (x, y) down; centred in box_w when given, else left-aligned."""
        for k, line in enumerate(lines):
            left = draw.textbbox((0, 0), line, font=font)[0]
            dx = (box_w - width(line)) // 2 if box_w is not None else 0
            pen.text((x + dx - left, y + k * line_h), line, fill="black", font=font)

    write(titles, PAD, PAD // 2)
    most = max((len(h) for h in heads), default=0)
    for j, lines in enumerate(heads):  # bottom-aligned, so every heading sits on its column
        write(lines, margin + gap + j * (cell_w + gap), title_h + PAD // 2 + (most - len(lines)) * line_h, cell_w)
    for i, lines in enumerate(sides):  # centred on the row's height
        top = title_h + head_h + gap + i * (cell_h + gap)
        write(lines, PAD, top + max(0, (cell_h - len(lines) * line_h) // 2))
    return sheet


def _grid(rows: list[torch.Tensor], scale: int, gap: int) -> np.ndarray:
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    cell_h, cell_w = h * scale, w * scale
    sheet = np.full(((cell_h + gap) * len(rows) + gap, (cell_w + gap) * n + gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            big = img.numpy().repeat(scale, 0).repeat(scale, 1)
            y, x = gap + i * (cell_h + gap), gap + j * (cell_w + gap)
            sheet[y : y + cell_h, x : x + cell_w] = big[..., :3]
    return sheet


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font: scalable with FreeType (Pillow >= 10.1), else its fixed bitmap font. Never downloads."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _fit(text: str, fits: Callable[[str], bool], max_lines: int) -> list[str]:
    """Word-wrap text ("\\n" breaks a line) into at most max_lines lines that fit; cut what is left with "..."."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            joined = f"{line} {word}" if line else word
            if fits(joined) or not line:
                line = joined
            else:
                lines.append(line)
                line = word
        lines.append(line)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    return [_clip(line, fits, cut and k == len(lines) - 1) for k, line in enumerate(lines)]


def _clip(line: str, fits: Callable[[str], bool], more: bool) -> str:
    """The line as is if it fits (and nothing follows it), else its longest prefix that fits with "..."."""
    if not more and fits(line):
        return line
    while line and not fits(line.rstrip() + ELLIPSIS):
        line = line[:-1]
    return line.rstrip() + ELLIPSIS if fits(line.rstrip() + ELLIPSIS) else ""


def save_png(image: Image.Image, path: str | Path) -> None:
    image.save(path, format="PNG")
