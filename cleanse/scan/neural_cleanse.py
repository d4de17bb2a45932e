"""`cleanse scan`'s model check: reverse a trigger per class, flag classes whose trigger is anomalously small.

The clean images are split by class and seed: 80% drive the optimisation, 20%
are held out to measure each reversed trigger's attack success (and TAR), so
the figure reported is not the one the optimisation saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cleanse.attacks.trigger import Trigger, to_uint8
from cleanse.data.dataset import Dataset
from cleanse.data.subset import clean_subset
from cleanse.engine.evaluate import predict
from cleanse.engine.events import Callback
from cleanse.engine.tar import measure_tar
from cleanse.models import ClassifierModel
from cleanse.scan.anomaly import anomaly_index, flag_small
from cleanse.scan.reverse import Budget, Reversed, reverse_triggers

HOLD_OUT = 0.2


@dataclass
class ModelScan:
    doc: dict[str, Any]  # the scan.json document (trigger_file filled in by the caller)
    triggers: dict[int, Trigger]  # every class's reversed trigger
    reversed: Reversed
    optimised: Dataset  # the clean images the triggers were reversed from
    held: Dataset  # the held-out clean images their attack success was measured on


def reversed_trigger(mask: torch.Tensor, pattern: torch.Tensor, target: int, budget: str) -> Trigger:
    c, h, w = pattern.shape
    return Trigger(
        kind="blend",
        tensors={"mask": mask.clamp(0, 1).float(), "pattern": pattern.clamp(0, 1).float()},
        target=target,
        input_size=(c, h, w),
        attack="neural-cleanse",
        params={"budget": budget},
        origin="scan",
    )


def scan_model(
    model: ClassifierModel,
    clean: Dataset,
    n_clean: int,
    budget_name: str,
    budget: Budget,
    threshold: float,
    seed: int,
    precision: str,
    layer: str | None,
    callback: Callback | None = None,
    scale: str = "log",
    statistic: str = "loo-z",
) -> ModelScan:
    split = clean_subset(clean, n=n_clean, seed=seed, hold_back=HOLD_OUT)
    num_classes = model.spec.num_classes
    rev = reverse_triggers(
        model,
        split.train.images,
        split.train.labels,
        list(range(num_classes)),
        budget,
        seed=seed,
        precision=precision,
        callback=callback,
    )
    index = anomaly_index(rev.mask_l1, scale, statistic)  # the verdict's statistic
    mad = anomaly_index(rev.mask_l1, scale, "mad")
    linear = anomaly_index(rev.mask_l1, "linear", "mad")  # Neural Cleanse's own figure, for comparison
    flagged = flag_small(rev.mask_l1, threshold, scale, statistic)
    held = split.held
    triggers, rows = {}, []
    for k in range(num_classes):
        trig = reversed_trigger(rev.masks[k], rev.patterns[k], k, budget_name)
        triggers[k] = trig
        keep = held.labels != k
        hits = predict(model, trig.apply_uint8(held.images[keep]), precision="fp32") == k
        tar = measure_tar(model, held.images, held.labels, trig, layer, with_clean=False) if layer else None
        rows.append(
            {
                "index": k,
                "name": model.spec.classes[k],
                "mask_l1": float(rev.mask_l1[k]),
                "anomaly_index": float(index[k]),
                "anomaly_index_mad": float(mad[k]),
                "anomaly_index_linear": float(linear[k]),
                "flagged": k in flagged,
                "attack_success_rate": float(hits.float().mean()) if len(hits) else None,
                "optimisation_success": float(rev.success[k]),
                "reached_success": bool(rev.reached[k]),
                "steps_run": int(rev.steps_run[k]),
                "tar": None if tar is None else tar["tar"],
                "tar_median": None if tar is None else tar["tar_median"],
                "trigger_file": None,
            }
        )
    doc = {
        "backdoored": bool(flagged),
        "suspected_targets": flagged,
        "statistic": statistic,
        "threshold": threshold,
        "scale": scale,
        "budget": budget_name,
        "steps": budget.steps,
        "batch": budget.batch,
        "early_stop_rounds": budget.early_stop,
        "steps_run_total": int(rev.steps_run.sum()),
        "n_clean": len(split.train) + len(held),
        "n_optimise": len(split.train),
        "n_held_out": len(held),
        "tar_layer": layer,
        "median_mask_l1": float(rev.mask_l1.double().quantile(0.5)),
        "optimise_seconds": rev.seconds,
        "classes": rows,
    }
    return ModelScan(doc, triggers, rev, split.train, held)


def mask_pictures(rev: Reversed) -> list[torch.Tensor]:
    """Per class: uint8 (3,H,W,C) images of the mask (grey), the pattern, and mask * pattern."""
    out = []
    for mask, pattern in zip(rev.masks, rev.patterns, strict=True):
        m = mask.unsqueeze(0).expand_as(pattern)
        pics = torch.stack([m, pattern, m * pattern]) * 255
        out.append(to_uint8(pics).permute(0, 2, 3, 1))
    return out
