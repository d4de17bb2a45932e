"""The before/after figures of a model on a clean set: CA/ASR/RA, TAR and reporting-only ASR/RA of extra triggers."""

from __future__ import annotations

from typing import Any

from cleanse.attacks.trigger import Trigger
from cleanse.data.dataset import Dataset
from cleanse.engine.evaluate import evaluate
from cleanse.engine.tar import measure_tar
from cleanse.models import ClassifierModel

SUMMARY_KEYS = (
    "clean_accuracy",
    "attack_success_rate",
    "robust_accuracy",
    "tar",
    "tar_median",
    "attention_share",
    "clean_tar",
    "per_class_accuracy",
)


def measure(
    model: ClassifierModel,
    data: Dataset,
    trigger: Trigger | None,
    layer: str | None,
    eval_triggers: dict[str, Trigger] | None = None,
) -> dict[str, Any]:
    """CA/ASR/RA and TAR figures (all keys present, null when undefined), plus reporting-only ASR/RA per
    --eval-trigger. TAR needs a trigger and a Grad-CAM layer."""
    m = evaluate(model, data, trigger)
    out: dict[str, Any] = {k: m.get(k) for k in SUMMARY_KEYS}
    if eval_triggers:
        extras = {}
        for name, extra in eval_triggers.items():
            e = evaluate(model, data, extra)
            extras[name] = {"attack_success_rate": e["attack_success_rate"], "robust_accuracy": e["robust_accuracy"]}
        out["eval_triggers"] = extras
    if trigger is not None and layer is not None:
        t = measure_tar(model, data.images, data.labels, trigger, layer)
        out.update(
            {
                "tar": t["tar"],
                "tar_median": t["tar_median"],
                "attention_share": t["attention_share"],
                "clean_tar": t["clean_tar"],
                "cam_shift": t["cam_shift"],
            }
        )
    return out


def unmeasured() -> dict[str, Any]:
    """The before/after figures when there is no set to measure on: every key present, all null."""
    return {k: None for k in SUMMARY_KEYS}


def class_changes(
    before: list[float | None] | None, after: list[float | None] | None, names: list[str]
) -> list[tuple[str, float]]:
    """(class name, change of its clean accuracy in points), largest change first; classes without images left out
    (none at all when nothing was measured)."""
    if before is None or after is None:
        return []
    pairs = [
        (name, 100 * (a - b))
        for name, b, a in zip(names, before, after, strict=False)
        if a is not None and b is not None
    ]
    return sorted(pairs, key=lambda p: -abs(p[1]))
