"""`cleanse scan --audit-data`: rank the samples of a (possibly poisoned) training set by suspicion.

Each registered detector scores every sample from its penultimate-layer
features; the combined suspicion is the mean of the detectors' percentile
ranks. With ground truth in the file (`poisoned`), precision and recall at the
expected poison count k = round(rate * N) are computed for each detector and
for the combination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cleanse.data.dataset import Dataset
from cleanse.models import ClassifierModel
from cleanse.registry import Registry
from cleanse.scan.activation_clustering import clustering_scores
from cleanse.scan.features import penultimate
from cleanse.scan.spectral import spectral_scores

AUDITS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("data audit")
AUDITS.register("spectral")(spectral_scores)
AUDITS.register("activation-clustering")(lambda feats, labels: clustering_scores(feats, labels)[0])


def percentile_rank(scores: torch.Tensor) -> torch.Tensor:
    """Each score's rank in [0, 1] (ties share the mean rank)."""
    order = scores.argsort()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(len(scores), dtype=torch.float64)
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = (starts + (counts - 1) / 2).double()
    ranks[order] = mean_rank[inverse]
    return ranks / max(1, len(scores) - 1)


def precision_recall(scores: torch.Tensor, truth: torch.Tensor, k: int) -> dict[str, float | None]:
    if k < 1 or not truth.any():
        return {"precision": None, "recall": None}
    top = scores.argsort(descending=True)[:k]
    hits = int(truth[top].sum())
    return {"precision": hits / k, "recall": hits / int(truth.sum())}


def audit_data(model: ClassifierModel, data: Dataset, rate: float | None, precision: str = "fp32") -> dict[str, Any]:
    feats = penultimate(model, data.images, model.spec.num_classes, precision)
    per_method = {name: AUDITS.get(name)(feats, data.labels) for name in AUDITS.names()}
    combined = torch.stack([percentile_rank(s) for s in per_method.values()]).mean(0)
    truth = data.poisoned if data.poisoned is not None and data.poisoned.any() else None
    k = round(rate * len(data)) if rate is not None else None
    order = combined.argsort(descending=True)
    ranking = [
        {
            "rank": r + 1,
            "row": int(i),
            "label": int(data.labels[i]),
            "suspicion": float(combined[i]),
            **{name: float(s[i]) for name, s in per_method.items()},
            "poisoned": None if truth is None else bool(truth[i]),
        }
        for r, i in enumerate(order.tolist())
    ]
    doc: dict[str, Any] = {
        "n": len(data),
        "expected_rate": rate,
        "k": k,
        "methods": list(per_method),
        "ground_truth": truth is not None,
        "ranking": ranking,
    }
    if truth is not None and k:
        doc["precision_recall"] = {name: precision_recall(s, truth, k) for name, s in per_method.items()}
        doc["precision_recall"]["combined"] = precision_recall(combined.float(), truth, k)
    return doc
