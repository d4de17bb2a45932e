"""image_grid: the bare grid pixel for pixel, and labels that stay in their own band, margin and column."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageFont

from cleanse import viz
from cleanse.viz import image_grid

WHITE = 255


def _cells(n_rows: int = 2, n_cols: int = 2, size: int = 8) -> list[torch.Tensor]:
    """Rows of flat, dark, distinct images (never white, so every cell pixel counts as ink)."""
    values = torch.arange(n_rows * n_cols, dtype=torch.uint8).mul(10).view(n_rows, n_cols, 1, 1, 1)
    return list(values.expand(n_rows, n_cols, size, size, 3).clone())


def _ink(a: np.ndarray) -> bool:
    return bool((a != WHITE).any())


def test_without_labels_the_pixels_are_the_old_grid():
    a = torch.tensor([[[1, 2, 3], [4, 5, 6]]], dtype=torch.uint8)  # 1x2 images, (H, W, C)
    b, c, d = a + 10, a + 20, a + 30
    rows = [torch.stack([a, b]), torch.stack([c, d])]
    got = np.asarray(image_grid(rows, scale=2, gap=1))
    # cells are 2x4 after scaling by 2, with 1 white pixel around and between: 2*2+3 rows, 2*4+3 columns
    expected = np.full((7, 11, 3), 255, dtype=np.uint8)
    for (y, x), img in zip([(1, 1), (1, 6), (4, 1), (4, 6)], [a, b, c, d], strict=True):
        expected[y : y + 2, x : x + 4] = img.numpy().repeat(2, 0).repeat(2, 1)
    assert got.shape == (7, 11, 3)
    np.testing.assert_array_equal(got, expected)
    # and the label arguments left at None change nothing
    np.testing.assert_array_equal(
        np.asarray(image_grid(rows, scale=2, gap=1, col_labels=None, row_labels=None, title=None)), expected
    )


def test_column_headings_add_a_band_with_ink_above_each_column_and_nowhere_else():
    rows, scale, gap = _cells(), 4, 2
    bare = np.asarray(image_grid(rows, scale, gap))
    sheet = np.asarray(image_grid(rows, scale, gap, col_labels=["img", "cam"]))
    band = sheet.shape[0] - bare.shape[0]
    assert band > 0 and sheet.shape[1] == bare.shape[1]
    np.testing.assert_array_equal(sheet[band:], bare)  # the grid sits unchanged below the band
    cell = 8 * scale
    spans = [(gap + j * (cell + gap), gap + j * (cell + gap) + cell) for j in range(2)]
    for x0, x1 in spans:
        assert _ink(sheet[:band, x0:x1])
    assert not _ink(sheet[:band, : spans[0][0]]) and not _ink(sheet[:band, spans[-1][1] :])


def test_row_labels_widen_the_sheet_on_the_left():
    rows = _cells()
    bare = np.asarray(image_grid(rows))
    sheet = np.asarray(image_grid(rows, row_labels=["clean", "poisoned"]))
    margin = sheet.shape[1] - bare.shape[1]
    assert margin > 0 and sheet.shape[0] == bare.shape[0]
    np.testing.assert_array_equal(sheet[:, margin:], bare)
    cell = 8 * 4
    for i in range(2):
        y0 = 2 + i * (cell + 2)
        assert _ink(sheet[y0 : y0 + cell, :margin])


def test_a_title_goes_on_top_of_the_headings():
    rows = _cells()
    headed = np.asarray(image_grid(rows, col_labels=["a", "b"]))
    titled = np.asarray(image_grid(rows, col_labels=["a", "b"], title="what this sheet shows"))
    top = titled.shape[0] - headed.shape[0]
    assert top > 0 and _ink(titled[:top])
    np.testing.assert_array_equal(titled[top:], headed)


@pytest.mark.parametrize(
    "label", ["a heading far too long for a cell of thirty-two pixels, wrapped and cut", "x" * 200, "W" * 60]
)
def test_a_long_heading_never_reaches_the_neighbour_column(label):
    rows, gap = _cells(n_cols=3), 2
    bare = np.asarray(image_grid(rows))
    sheet = np.asarray(image_grid(rows, col_labels=["", label, ""]))
    band = sheet.shape[0] - bare.shape[0]
    cell = 8 * 4
    x0, x1 = gap + (cell + gap), gap + (cell + gap) + cell  # the middle column
    assert _ink(sheet[:band, x0:x1])
    assert not _ink(sheet[:band, :x0]) and not _ink(sheet[:band, x1:])


def test_a_long_row_label_stays_in_the_margin_and_its_row():
    rows = _cells(n_rows=3)
    bare = np.asarray(image_grid(rows))
    sheet = np.asarray(image_grid(rows, row_labels=["", "y" * 300 + "\n" + "more words " * 50, ""]))
    margin = sheet.shape[1] - bare.shape[1]
    np.testing.assert_array_equal(sheet[:, margin:], bare)
    cell = 8 * 4
    y0 = 2 + (cell + 2)
    assert _ink(sheet[y0 : y0 + cell, :margin])
    assert not _ink(sheet[:y0, :margin]) and not _ink(sheet[y0 + cell :, :margin])


def test_more_labels_than_columns_or_rows_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        image_grid(_cells(), col_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="labels"):
        image_grid(_cells(), row_labels=["a", "b", "c"])


def test_the_bitmap_font_fallback_also_fits(monkeypatch):
    """Without FreeType (or before Pillow 10.1) load_default gives a fixed bitmap font; labels still fit."""
    monkeypatch.setattr(viz, "_font", ImageFont.load_default_imagefont)
    rows, gap, cell = _cells(n_cols=3), 2, 8 * 4
    bare = np.asarray(image_grid(rows))
    sheet = np.asarray(image_grid(rows, col_labels=["", "x" * 200, ""]))
    band = sheet.shape[0] - bare.shape[0]
    x0, x1 = gap + (cell + gap), gap + (cell + gap) + cell
    assert _ink(sheet[:band, x0:x1])
    assert not _ink(sheet[:band, :x0]) and not _ink(sheet[:band, x1:])
    full = np.asarray(image_grid(rows, col_labels=["a", "b", "c"], row_labels=["r" * 80, "s"], title="t" * 500))
    top, margin = full.shape[0] - bare.shape[0], full.shape[1] - bare.shape[1]
    assert top > band and margin > 0
    np.testing.assert_array_equal(full[top:, margin:], bare)
