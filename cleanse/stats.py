"""Robust statistics shared by the detectors (cleanse/scan) and the recipes (cleanse/recipes)."""

from __future__ import annotations

import torch

MAD_SCALE = 1.4826  # makes the MAD a consistent estimator of the standard deviation for normal data


def median_and_mad(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The median of `values` and MAD_SCALE * their median absolute deviation from it (a robust standard deviation).

    Both medians average the two middle values for an even count, as numpy's median does (torch.median takes the
    lower one).
    """
    median = values.quantile(0.5)
    return median, MAD_SCALE * (values - median).abs().quantile(0.5)
