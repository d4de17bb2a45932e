"""Poison a dataset: replace a seeded share of rows with triggered copies (N unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cleanse.attacks.base import ATTACKS, Attack
from cleanse.attacks.trigger import Trigger, parse_target, rows_at_once
from cleanse.data.dataset import Dataset, write_dataset_tensors
from cleanse.errors import CleanseError
from cleanse.files import RowSource, private_copy

MAX_ROWS_AT_ONCE = 1024  # poisoned rows triggered at once (fewer for large images: trigger.rows_at_once)


def poison_dataset(
    dataset: Dataset, attack: str, target: int | str, rate: float, seed: int = 0, params: dict[str, str] | None = None
) -> tuple[Dataset, Trigger]:
    """Return the poisoned dataset and its trigger. The same seed gives identical tensors."""
    plan = plan_poison(dataset, attack, target, rate, seed, params)
    return plan.dataset(), plan.trigger


def plan_poison(
    dataset: Dataset, attack: str, target: int | str, rate: float, seed: int = 0, params: dict[str, str] | None = None
) -> PoisonPlan:
    """Decide what poisoning `dataset` changes (no image is touched yet); see PoisonPlan."""
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

    new_labels = labels.clone()
    if not spec.clean_label:
        new_labels[chosen] = trigger.target_labels(labels[chosen], dataset.num_classes)
    poisoned = torch.zeros(len(dataset), dtype=torch.bool)
    poisoned[chosen] = True

    noise = None
    picked = torch.zeros(0, dtype=torch.long)
    ratio = float(parsed.get("cross_ratio", 0) or 0)
    if ratio > 0:
        rest = torch.nonzero(~poisoned).flatten()
        noise_count = min(len(rest), round(ratio * count))
        picked = rest[torch.randperm(len(rest), generator=gen)[:noise_count]].sort().values
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
        "noise_count": len(picked),
    }
    return PoisonPlan(dataset, trigger, chosen, picked, new_labels, poisoned, noise, meta, gen.get_state(), spec)


@dataclass
class PoisonPlan:
    """What poisoning changes, decided before any image is touched: the rows that get the trigger (`chosen`) or the
    attack's noise (`picked`, WaNet's noise mode), the new labels and flags, and the generator state the noise draws
    start from. `dataset()` applies it in memory (only the edited rows take memory when the source is mapped);
    `rows()` computes any block of the poisoned images from the clean ones, so `save_poisoned` streams the result to
    disk without holding the edited rows. Both give the same bytes: the noise is drawn row by row in ascending order,
    and a uniform draw split into blocks equals the draw at once."""

    source: Dataset
    trigger: Trigger
    chosen: torch.Tensor  # sorted row indices
    picked: torch.Tensor  # sorted row indices (empty without noise)
    labels: torch.Tensor
    poisoned: torch.Tensor
    noise: torch.Tensor | None
    meta: dict[str, Any]
    noise_state: torch.Tensor  # the generator's state where the noise draws begin
    attack: Attack
    _stream: torch.Generator | None = field(default=None, init=False, repr=False)  # rows()'s draws so far

    @property
    def dtype(self) -> torch.dtype:
        return self.source.images.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.images.shape)

    def _edit(self, images: torch.Tensor, chosen: torch.Tensor, picked: torch.Tensor, gen: torch.Generator) -> None:
        """Trigger `images[chosen]` and noise `images[picked]` in place, a bounded chunk of rows at a time."""
        chunk = rows_at_once(tuple(images.shape[1:]), MAX_ROWS_AT_ONCE)
        for start in range(0, len(chosen), chunk):
            rows = chosen[start : start + chunk]
            images[rows] = self.trigger.apply_uint8(images[rows])
        for start in range(0, len(picked), chunk):
            rows = picked[start : start + chunk]
            images[rows] = self.attack.noise_rows(images[rows], self.trigger, gen)

    def _generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.set_state(self.noise_state)
        return gen

    def dataset(self) -> Dataset:
        """The poisoned dataset in memory."""
        # a memory-mapped source is mapped again copy-on-write: only the rows edited take memory
        images = private_copy(self.source.images)
        self._edit(images, self.chosen, self.picked, self._generator())
        s = self.source
        return Dataset(
            images, self.labels, list(s.classes), s.source, self.poisoned, s.labels.clone(), self.noise, self.meta
        )

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Poisoned rows start..stop-1. Blocks must be asked for in ascending order, each once, from row 0: the noise
        draws continue from one block to the next (`save_poisoned` does so)."""
        if start == 0 or self._stream is None:
            self._stream = self._generator()
        block = self.source.images[start:stop].clone()
        inside = lambda idx: idx[(idx >= start) & (idx < stop)] - start  # noqa: E731
        self._edit(block, inside(self.chosen), inside(self.picked), self._stream)
        return block


def save_poisoned(plan: PoisonPlan, path: str | Path) -> None:
    """Write the poisoned dataset `plan.dataset()` would give, computing its images a block at a time from the clean
    ones: memory stays that of one block however many rows are poisoned."""
    s = plan.source
    tensors: dict[str, torch.Tensor | RowSource] = {"images": plan, "labels": plan.labels, "poisoned": plan.poisoned}
    tensors["original_labels"] = s.labels
    if plan.noise is not None:
        tensors["noise"] = plan.noise
    write_dataset_tensors(path, tensors, list(s.classes), plan.meta)
