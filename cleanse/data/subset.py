"""The clean subset every recipe uses: stratified, seeded, with a held-back part for decisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cleanse.data.dataset import Dataset
from cleanse.errors import CleanseError

HOLD_BACK = 0.10


@dataclass
class CleanSplit:
    train: Dataset  # what the recipe learns from
    held: Dataset  # held back for the recipe's own decisions (early stop, state kept)
    train_index: torch.Tensor  # row indices into the filtered (clean) data
    held_index: torch.Tensor
    filtered: int  # rows dropped first because they were marked poisoned or noise


def clean_subset(
    data: Dataset,
    frac: float | None = None,
    n: int | None = None,
    seed: int = 0,
    hold_back: float = HOLD_BACK,
    n_flag: str = "--clean-n",
) -> CleanSplit:
    """Drop rows marked poisoned/noise, then draw `frac` of the rest (or `n` in all) per class by seed.

    `hold_back` of each class's draw (at least 1) is held back; fewer than 2 per class is refused. `n_flag` is the
    command's name for `n` in messages (`--clean-n` for unlearn, `--n-clean` for scan).
    """
    if (frac is None) == (n is None):
        raise CleanseError("give exactly one of --clean-frac and --clean-n")
    if frac is not None and not 0 < frac <= 1:
        raise CleanseError(f"--clean-frac {frac} must lie in (0, 1]; e.g. 0.05 for 5% of the data")
    if n is not None and n < 1:
        raise CleanseError(f"{n_flag} {n} must be a positive number of images")
    bad = data.suspicious_mask()
    clean = data.subset((~bad).nonzero().flatten()) if bad.any() else data
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(clean.labels, minlength=clean.num_classes)
    total = int(counts.sum())
    if frac is not None:
        wants = [round(frac * int(c)) for c in counts]
    else:  # largest-remainder allocation, so the class counts add up to exactly n
        assert n is not None  # exactly one of frac and n, checked above
        quotas = [n * int(c) / total for c in counts]
        wants = [int(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda i: quotas[i] - wants[i], reverse=True)
        for cls in by_remainder[: min(n, total) - sum(wants)]:
            wants[cls] += 1
    train_parts, held_parts = [], []
    for cls in range(clean.num_classes):
        rows = (clean.labels == cls).nonzero().flatten()
        want = min(wants[cls], len(rows))
        if want < 2:
            what = f"--clean-frac {frac}" if frac is not None else f"{n_flag} {n}"
            need = f"; {n_flag} {2 * clean.num_classes} or more would do" if frac is None else ""
            raise CleanseError(
                f"{what} leaves {want} image(s) of class {cls} ({clean.classes[cls]}); "
                f"at least 2 per class are needed, raise it{need}"
            )
        pick = rows[torch.randperm(len(rows), generator=gen)[:want]]
        hold = max(1, round(hold_back * want))
        held_parts.append(pick[:hold])
        train_parts.append(pick[hold:])
    train_index = torch.cat(train_parts).sort().values
    held_index = torch.cat(held_parts).sort().values
    return CleanSplit(clean.subset(train_index), clean.subset(held_index), train_index, held_index, int(bad.sum()))
