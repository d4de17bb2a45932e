"""`cleanse scan --audit-data`: find the poisoned rows of a training set from the model's penultimate features.

Per class first (cleanse/scan/activation_clustering.py): is the class split in two (or collapsed), and which part is
the poison; the flagged rows are the poison side of each flagged class. Every row also gets a score, its position
on its class's discriminant axis (positive on the side called poison), and the ranking puts the rows of flagged
classes first, each ordered by that score. The registered ranking audits (`AUDITS`, spectral signatures) score every
row as well, for comparison. With ground truth in the file (`poisoned`), precision and recall are computed at the
flagged set and, for every ranking, at the expected poison count k = round(rate * N).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cleanse.data.dataset import Dataset
from cleanse.engine.features import penultimate
from cleanse.models import ClassifierModel
from cleanse.registry import Registry
from cleanse.scan.activation_clustering import (
    COLLAPSE_RATIO,
    MAX_DIMS,
    ROWS_PER_DIM,
    SEPARATION_THRESHOLD,
    VALLEY_THRESHOLD,
    audit_classes,
)
from cleanse.scan.spectral import spectral_scores

AUDITS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("data audit")
AUDITS.register("spectral")(spectral_scores)

RULE = (
    f"per class: 2-means and tail starts on the top principal directions of its penultimate features, refined "
    f"along Fisher's "
    f"discriminant (d = min({MAX_DIMS}, rows // {ROWS_PER_DIM})); a class is flagged when the split's separation "
    f"|mean_1 - mean_0| / pooled sd is at least {SEPARATION_THRESHOLD} and its valley (rows near the midpoint / "
    f"rows near the emptier mean) at most {VALLEY_THRESHOLD} (flagged rows: the cluster farther from the other "
    f"classes along the split, drawn by a two-Gaussian likelihood along it), or when its spread is under "
    f"{COLLAPSE_RATIO} x the other classes' median "
    "(flagged rows: the whole class)"
)


@dataclass
class Audit:
    doc: dict[str, Any]  # audit.json
    flagged: torch.Tensor  # (N,) bool: the rows --write-clean leaves out


def precision_recall(scores: torch.Tensor, truth: torch.Tensor, k: int) -> dict[str, float | None]:
    """Precision and recall of the k highest scores (stable order: the earlier row first among ties)."""
    if k < 1 or not truth.any():
        return {"precision": None, "recall": None}
    top = scores.argsort(descending=True, stable=True)[:k]
    hits = int(truth[top].sum())
    return {"precision": hits / k, "recall": hits / int(truth.sum())}


def set_precision_recall(flagged: torch.Tensor, truth: torch.Tensor) -> dict[str, float | None]:
    """Precision and recall of a flagged set (precision is null when nothing is flagged), and its F1."""
    hits = int((flagged & truth).sum())
    n_flagged, n_true = int(flagged.sum()), int(truth.sum())
    precision = hits / n_flagged if n_flagged else None
    recall = hits / n_true if n_true else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if n_true else None)
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": n_flagged, "true_positives": hits}


def ranking_order(audit_scores: torch.Tensor, class_flagged: torch.Tensor) -> torch.Tensor:
    """Rows of flagged classes first, each block by score, highest first (ties: the earlier row first)."""
    key = audit_scores.double() + class_flagged.double() * (audit_scores.abs().max().item() * 2 + 1)
    return key.argsort(descending=True, stable=True)


def audit_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    rate: float | None,
    truth: torch.Tensor | None = None,
    threshold: float = SEPARATION_THRESHOLD,
) -> Audit:
    """The audit from features already computed (the benchmark and the tests call this; `audit_data` adds the model)."""
    # float64 statistics on an (N, D) matrix: on the CPU, where they are exact and cheap, whatever the model's device
    # (MPS has no float64; CPU-made tensors must not meet device ones). One transfer, not one per batch.
    features, labels = features.float().cpu(), labels.cpu()
    truth = truth.cpu() if truth is not None else None
    result = audit_classes(features, labels, len(classes), threshold)
    per_method = {name: AUDITS.get(name)(features, labels) for name in AUDITS.names()}
    truth = truth if truth is not None and truth.any() else None
    n = len(labels)
    k = round(rate * n) if rate is not None else None
    order = ranking_order(result.scores, result.class_flagged)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    rank_key = -position.double()  # the split ranking as scores, for precision at k
    ranking = [
        {
            "rank": r + 1,
            "row": int(i),
            "label": int(labels[i]),
            "flagged": bool(result.flagged[i]),
            "score": float(result.scores[i]),
            **{name: float(s[i]) for name, s in per_method.items()},
            "poisoned": None if truth is None else bool(truth[i]),
        }
        for r, i in enumerate(order.tolist())
    ]
    class_docs = []
    for ev in result.classes:
        entry = {"name": classes[ev.index], **ev.to_json()}
        if truth is not None:
            rows = labels == ev.index
            entry["poisoned_rows"] = int(truth[rows].sum())
            entry["flagged_poisoned"] = int((truth & result.flagged & rows).sum())
        class_docs.append(entry)
    doc: dict[str, Any] = {
        "n": n,
        "rule": RULE,
        "threshold": threshold,
        "valley_threshold": VALLEY_THRESHOLD,
        "collapse_ratio": COLLAPSE_RATIO,
        "flagged_classes": [ev.index for ev in result.classes if ev.flagged],
        "flagged_rows": int(result.flagged.sum()),
        "expected_rate": rate,
        "k": k,
        "methods": ["split", *per_method],
        "ground_truth": truth is not None,
        "classes": class_docs,
        "ranking": ranking,
    }
    if truth is not None:
        doc["poisoned_rows"] = int(truth.sum())
        doc["flagged_set"] = set_precision_recall(result.flagged, truth)
        if k:
            doc["precision_recall"] = {"split": precision_recall(rank_key, truth, k)} | {
                name: precision_recall(s, truth, k) for name, s in per_method.items()
            }
    return Audit(doc, result.flagged)


def audit_data(
    model: ClassifierModel,
    data: Dataset,
    rate: float | None,
    precision: str = "fp32",
    threshold: float = SEPARATION_THRESHOLD,
) -> Audit:
    feats = penultimate(model, data.images, model.spec.num_classes, precision)
    return audit_features(feats, data.labels, list(data.classes), rate, data.poisoned, threshold)
