"""Defaults derived from the data when the user gives none."""

from __future__ import annotations

from cleanse.data.dataset import Dataset


def data_normalization(data: Dataset, sample: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to `sample` of) the training images, in [0, 1] units."""
    step = max(1, len(data) // sample)
    x = data.images[::step].float().div(255)
    flat = x.reshape(-1, x.shape[-1])
    return [round(float(v), 4) for v in flat.mean(0)], [round(max(float(v), 1e-3), 4) for v in flat.std(0)]
