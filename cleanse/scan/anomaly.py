"""The anomaly index that decides which reversed trigger is suspiciously small.

Two statistics over the per-class mask L1 norms n_c, both on v_c = log(n_c) by
default (`scale="log"`: mask sizes of different classes spread multiplicatively)
or on the raw norms (`scale="linear"`, Neural Cleanse's):

- `loo-z` (default): class c against the other classes only,
  |v_c - mean(v_-c)| / std(v_-c). The candidate does not widen the spread it is
  measured against, and the standard deviation of nine values is a far steadier
  yardstick than their MAD, whose verdict changed with the scan seed
  (docs/commands/scan.md, "The verdict").
- `mad`: Neural Cleanse's |v_c - median(v)| / (1.4826 * MAD(v)) over all classes.

A class is flagged when its index exceeds the threshold on the small side.
"""

from __future__ import annotations

import torch

from cleanse.errors import CleanseError
from cleanse.stats import MAD_SCALE as MAD_SCALE  # re-exported: scan/spectral.py imports it from here
from cleanse.stats import median_and_mad

SPREAD_FLOOR = (
    0.01  # when the spread (MAD or std) is 0 or tiny, divide by 1% of |centre| instead: never a division by 0
)
SCALES = ("log", "linear")
STATISTICS = ("loo-z", "mad")
DEFAULT_THRESHOLDS = {"loo-z": 3.5, "mad": 3.0}


def _values(norms: torch.Tensor, scale: str) -> torch.Tensor:
    if scale not in SCALES:
        raise CleanseError(f"--scale {scale!r} is unknown; choose one of: {', '.join(SCALES)}")
    norms = norms.double()
    return norms.clamp_min(1e-6).log() if scale == "log" else norms


def _floored(spread: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    floor = torch.where(centre.abs() > 0, SPREAD_FLOOR * centre.abs(), torch.full_like(centre, SPREAD_FLOOR))
    return torch.maximum(spread, floor).clamp_min(1e-12)


def _centres_and_spreads(values: torch.Tensor, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the centre and spread it is compared with."""
    k = len(values)
    if statistic == "mad":
        median, mad = median_and_mad(values)
        return median.expand(k), _floored(mad, median).expand(k)
    if statistic == "loo-z":
        others = values.unsqueeze(0).expand(k, k)[~torch.eye(k, dtype=torch.bool)].view(k, k - 1)
        centre = others.mean(1)
        return centre, _floored(others.std(1, correction=1), centre)
    raise CleanseError(f"--statistic {statistic!r} is unknown; choose one of: {', '.join(STATISTICS)}")


def anomaly_index(norms: torch.Tensor, scale: str = "linear", statistic: str = "mad") -> torch.Tensor:
    """Per class, |v_c - centre_c| / spread_c (see the module docstring), the spread floored at 1% of |centre|."""
    if len(norms) < 3:
        raise CleanseError(
            f"the anomaly test needs at least 3 classes; this model has {len(norms)}, so scan cannot rank them"
        )
    values = _values(norms, scale)
    centre, spread = _centres_and_spreads(values, statistic)
    return ((values - centre).abs() / spread).float()


def small_side(norms: torch.Tensor, scale: str = "linear", statistic: str = "mad") -> torch.Tensor:
    """Per class, whether it lies below the centre it is compared with (the side a backdoor's trigger falls on)."""
    values = _values(norms, scale)
    centre, _ = _centres_and_spreads(values, statistic)
    return values < centre


def flag_small(norms: torch.Tensor, threshold: float = 2.0, scale: str = "linear", statistic: str = "mad") -> list[int]:
    """Classes whose anomaly index exceeds `threshold` on the small side, most anomalous first."""
    index = anomaly_index(norms, scale, statistic)
    flagged = [int(i) for i in torch.nonzero((index > threshold) & small_side(norms, scale, statistic)).flatten()]
    return sorted(flagged, key=lambda i: -float(index[i]))
