"""Poison a dataset: replace a seeded share of rows with triggered copies (N unchanged)."""

from __future__ import annotations

from typing import Any

import torch

from cleanse.attacks.base import ATTACKS
from cleanse.attacks.trigger import Trigger, parse_target, rows_at_once
from cleanse.data.dataset import Dataset
from cleanse.errors import CleanseError
from cleanse.files import private_copy

MAX_ROWS_AT_ONCE = 1024  # poisoned rows triggered at once (fewer for large images: trigger.rows_at_once)


def poison_dataset(
    dataset: Dataset, attack: str, target: int | str, rate: float, seed: int = 0, params: dict[str, str] | None = None
) -> tuple[Dataset, Trigger]:
    """Return the poisoned dataset and its trigger. The same seed gives identical tensors."""
    if dataset.num_classes < 2:
        raise CleanseError(
            f"{dataset.source}: the data has only one class ({dataset.classes[0] if dataset.classes else '-'}); "
            "a backdoor maps images of other classes to a target, so pass data with at least 2 classes"
        )
    spec = ATTACKS.get(attack)
    parsed = spec.parse_params(params or {})
    goal = parse_target(target, dataset.num_classes)
    if not 0 < rate <= 1:
        raise CleanseError(f"--rate {rate} must lie in (0, 1]; it is the poisoned fraction of the whole dataset")
    if dataset.poisoned is not None and bool(dataset.poisoned.any()):
        raise CleanseError(f"{dataset.source}: the dataset is already poisoned; poison a clean dataset")
    gen = torch.Generator().manual_seed(seed)
    height, width = dataset.image_size
    trigger = spec.make_trigger(parsed, dataset.channels, height, width, gen)
    trigger.target = goal

    labels = dataset.labels
    if spec.clean_label:
        if isinstance(goal, dict):
            raise CleanseError(
                f"{attack} is clean-label and poisons only target-class images; pass one --target class, not 'all'"
            )
        candidates = torch.nonzero(labels == goal).flatten()
    elif isinstance(goal, dict):
        candidates = torch.arange(len(labels))
    else:
        candidates = torch.nonzero(labels != goal).flatten()
    count = round(rate * len(dataset))
    if count < 1:
        raise CleanseError(f"--rate {rate} poisons no image of {len(dataset)}; raise the rate")
    if count > len(candidates):
        share = len(candidates) / len(dataset)
        where = "target-class" if spec.clean_label else "eligible"
        raise CleanseError(
            f"--rate {rate} needs {count} {where} images but only {len(candidates)} exist ({share:.4f} of the data); "
            f"lower --rate to at most {share:.4f}"
        )
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values

    # a memory-mapped source is mapped again copy-on-write: only the rows edited below take memory
    images, new_labels = private_copy(dataset.images), labels.clone()
    chunk = rows_at_once(tuple(images.shape[1:]), MAX_ROWS_AT_ONCE)
    for start in range(0, len(chosen), chunk):
        rows = chosen[start : start + chunk]
        images[rows] = trigger.apply_uint8(images[rows])
    if not spec.clean_label:
        new_labels[chosen] = trigger.target_labels(labels[chosen], dataset.num_classes)
    poisoned = torch.zeros(len(dataset), dtype=torch.bool)
    poisoned[chosen] = True

    noise = None
    noise_count = 0
    ratio = float(parsed.get("cross_ratio", 0) or 0)
    if ratio > 0:
        rest = torch.nonzero(~poisoned).flatten()
        noise_count = min(len(rest), round(ratio * count))
        picked = rest[torch.randperm(len(rest), generator=gen)[:noise_count]].sort().values
        images[picked] = spec.noise_rows(images[picked], trigger, gen)
        noise = torch.zeros(len(dataset), dtype=torch.bool)
        noise[picked] = True

    meta: dict[str, Any] = {
        "source": dataset.meta.get("source", dataset.source),
        "attack": {
            "name": attack,
            "params": trigger.params,
            "target": goal,
            "rate": rate,
            "clean_label": spec.clean_label,
        },
        "seed": seed,
        "poisoned_count": count,
        "noise_count": noise_count,
    }
    out = Dataset(images, new_labels, list(dataset.classes), dataset.source, poisoned, labels.clone(), noise, meta)
    return out, trigger
