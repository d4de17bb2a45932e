"""What every detector takes and gives: the scan's inputs, and per class a statistic, a score and a flag.

A detector's `score` is either an anomaly index (larger is more suspicious, `score_name` "anomaly_index") or a
p-value (smaller is more suspicious, "p_value"); `flagged` lists the classes its own test flags, most suspicious
first. The combined verdict (cleanse/scan/verdict.py) reads only these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from cleanse.attacks.trigger import Trigger
from cleanse.data.dataset import Dataset
from cleanse.engine.distributed import SINGLE, Ranks
from cleanse.engine.events import Callback
from cleanse.engine.memory import MemoryPlan
from cleanse.models import ClassifierModel
from cleanse.registry import Registry
from cleanse.scan.reverse import Budget


@dataclass
class ScanInputs:
    model: ClassifierModel
    optimise: Dataset | None  # clean images the reversal detectors optimise on (None: data-free scan)
    held: Dataset | None  # held-out clean images their triggers' attack success is measured on
    budget_name: str
    budget: Budget
    seed: int
    precision: str
    layer: str | None  # TAR layer for patch triggers (None: no TAR)
    statistic: str = "loo-z"  # the reversal detectors' outlier test
    scale: str = "log"
    threshold: float = 3.5
    alpha: float = 0.05  # p-value detectors' level
    memory: MemoryPlan | None = None  # the step memory budget (None: every class in one step)
    ranks: Ranks = SINGLE  # under torchrun each rank scores its block of classes (distributed.class_block)

    def chunk(self, images_per_class: int, num_classes: int) -> int:
        """Classes per forward for a detector that optimises `images_per_class` images per class: the memory plan's
        chunk (cleanse/engine/memory.py), or every class without a plan."""
        return num_classes if self.memory is None else self.memory.chunk(images_per_class, num_classes)

    def images_per_forward(self, images_per_class: int) -> int:
        """One class's images per forward for a detector that can cut a class's batch: the memory plan's slice, or
        the whole batch without a plan."""
        return images_per_class if self.memory is None else self.memory.images_per_forward(images_per_class)


@dataclass
class DetectorReport:
    name: str
    score_name: str  # "anomaly_index" (large = suspicious) or "p_value" (small = suspicious)
    statistic_name: str  # what `statistic` measures, e.g. "mask_l1"
    classes: list[dict[str, Any]]  # per class: index, statistic, score, flagged, and the detector's own fields
    flagged: list[int]  # classes its test flags, most suspicious first
    doc: dict[str, Any]  # detector-level facts (threshold, budget, seconds, ...)
    triggers: dict[int, Trigger] = field(default_factory=dict)  # every class's reversed trigger (reversal only)
    pictures: list[torch.Tensor] = field(default_factory=list)  # per class uint8 (P,H,W,C), reversal only
    picture_labels: tuple[str, ...] = ()
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score_name,
            "statistic": self.statistic_name,
            "flagged": self.flagged,
            **self.doc,
            "classes": self.classes,
        }


class Detector(ABC):
    name: str
    needs_data: bool  # False: runs on the model alone
    summary: str
    loop_kind: str  # the progress loop kind whose rows it emits
    cuts_batches = False  # can a class's images per step be split over several forwards (the reversal's can)

    @abstractmethod
    def run(self, inputs: ScanInputs, callback: Callback | None = None) -> DetectorReport:
        """Score every class of the model."""

    @abstractmethod
    def images_per_class(self, inputs: ScanInputs) -> int:
        """Images each class puts through the model per optimisation step (what the memory plan divides by)."""

    def images_per_forward(self, inputs: ScanInputs) -> int:
        """Images of one class in one forward: the memory plan's slice for a detector that can cut a class's batch
        (`cuts_batches`), else all of them."""
        whole = self.images_per_class(inputs)
        return inputs.images_per_forward(whole) if self.cuts_batches else whole


DETECTORS: Registry[Detector] = Registry("detector")
