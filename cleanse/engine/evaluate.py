"""Evaluation: CA, ASR and RA (DESIGN section 4), one eval-mode forward per image, no TTA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cleanse.attacks.trigger import Trigger, rows_at_once
from cleanse.data.dataset import Dataset
from cleanse.engine.device import autocast

EVAL_BATCH = 1024  # images per eval forward at 32x32; larger inputs take fewer (eval_batch)
EVAL_PIXELS = EVAL_BATCH * 32 * 32  # pixels per eval forward: activations grow with H x W, so the batch shrinks
TRIGGER_CHUNK = 4096  # eligible images triggered (and held) at once by `evaluate`


def eval_batch(images: torch.Tensor) -> int:
    """Images per eval forward for uint8 (N,H,W,C) images: 1024 at 32x32 or smaller, fewer as H x W grows (256 at
    64x64, 20 at 224x224), so the activations of one forward stay near what 1024 CIFAR images take."""
    return max(1, min(EVAL_BATCH, EVAL_PIXELS // (images.shape[1] * images.shape[2])))


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int | None = None,
    precision: str = "fp32",
    return_logits: bool = False,
) -> torch.Tensor:
    """Predicted classes (or logits) for uint8 (N,H,W,C) images, computed on the model's device, `batch_size` images
    at a time (None: eval_batch)."""
    batch_size = batch_size or eval_batch(images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        with autocast(device, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        outputs.append(logits.float() if return_logits else logits.argmax(1))
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0)


@dataclass
class TriggeredSet:
    """Held-out triggered images whose true class is not the target, with their labels."""

    images: torch.Tensor
    true_labels: torch.Tensor
    target_labels: torch.Tensor

    @classmethod
    def build(cls, dataset: Dataset, trigger: Trigger) -> TriggeredSet:
        keep = _eligible(dataset, trigger)
        labels = dataset.labels[keep]
        return cls(
            trigger.apply_uint8(dataset.images[keep]), labels, trigger.target_labels(labels, dataset.num_classes)
        )


def _eligible(dataset: Dataset, trigger: Trigger) -> torch.Tensor:
    """The rows of `dataset` whose triggered copies count for ASR/RA, after checking the trigger fits."""
    height, width = dataset.image_size
    trigger.check_size(dataset.channels, height, width, what=f"the images of {dataset.source}")
    trigger.check_classes(dataset.num_classes)
    return trigger.eligible(dataset.labels).nonzero().flatten()


def predict_triggered(
    model: nn.Module, dataset: Dataset, trigger: Trigger, precision: str = "fp32", chunk: int = TRIGGER_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions on the triggered eligible images, with their true and target labels; `chunk` images are triggered
    at a time, so the triggered set is never held whole."""
    keep = _eligible(dataset, trigger)
    chunk = rows_at_once(tuple(dataset.images.shape[1:]), chunk)
    preds = [
        predict(model, trigger.apply_uint8(dataset.images[keep[start : start + chunk]]), precision=precision)
        for start in range(0, len(keep), chunk)
    ]
    labels = dataset.labels[keep]
    tpreds = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return tpreds, labels, trigger.target_labels(labels, dataset.num_classes)


def rate(hits: torch.Tensor) -> float | None:
    return int(hits.sum()) / len(hits) if len(hits) else None


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    trigger: Trigger | None = None,
    precision: str = "fp32",
    triggered: TriggeredSet | None = None,
) -> dict[str, Any]:
    """CA on `dataset` (overall and per class, None for a class without images); with a trigger also ASR and RA
    on its eligible triggered copies."""
    preds = predict(model, dataset.images, precision=precision)
    per_class = [rate(preds[dataset.labels == c] == c) for c in range(dataset.num_classes)]
    result: dict[str, Any] = {
        "clean_accuracy": rate(preds == dataset.labels),
        "attack_success_rate": None,
        "robust_accuracy": None,
        "n_clean": len(dataset),
        "n_triggered": 0,
        "per_class_accuracy": per_class,
    }
    if triggered is not None:
        tpreds = predict(model, triggered.images, precision=precision)
        true, target = triggered.true_labels, triggered.target_labels
    elif trigger is not None:
        tpreds, true, target = predict_triggered(model, dataset, trigger, precision)
    else:
        return result
    result["attack_success_rate"] = rate(tpreds == target)
    result["robust_accuracy"] = rate(tpreds == true)
    result["n_triggered"] = len(tpreds)
    return result


def der(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Defense effectiveness rating (BackdoorBench): (max(0, dASR) - max(0, dCA) + 1) / 2."""
    keys = ("attack_success_rate", "clean_accuracy")
    if any(before.get(k) is None or after.get(k) is None for k in keys):
        return None
    d_asr = max(0.0, before["attack_success_rate"] - after["attack_success_rate"])
    d_ca = max(0.0, before["clean_accuracy"] - after["clean_accuracy"])
    return (d_asr - d_ca + 1) / 2
