"""Reverse-engineering detectors, one per trigger family (patch, additive, warp).

Per class, the smallest trigger of the family that sends the clean images of other classes to that class
(on 99% of them for a patch, 90% for the smooth families; cleanse/scan/reverse.py). A class whose smallest
trigger is an outlier on the small side among the classes (leave-one-out z of the log sizes,
cleanse/scan/anomaly.py) is flagged. Each reversed trigger is measured on held-out clean images (attack
success; TAR where the trigger has a region). Under torchrun each rank reverses and measures its block of classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cleanse.attacks.trigger import Trigger
from cleanse.data.dataset import Dataset
from cleanse.engine.distributed import class_block, gather_rows
from cleanse.engine.evaluate import predict
from cleanse.engine.events import Callback
from cleanse.engine.tar import measure_tar
from cleanse.scan.anomaly import anomaly_index, flag_small, small_side
from cleanse.scan.detectors.base import DETECTORS, Detector, DetectorReport, ScanInputs
from cleanse.scan.families import ADDITIVE, PATCH, WARP, Family
from cleanse.scan.reverse import projected_sizes, reverse_triggers


class ReversalDetector(Detector):
    needs_data = True
    loop_kind = "scan"
    cuts_batches = True  # a class's batch can be cut into slices (cleanse/scan/reverse.py)

    def __init__(self, family: Family) -> None:
        self.family = family
        self.name = family.name
        self.summary = f"{family.description}; flags a class whose trigger is an outlier on the small side"

    def images_per_class(self, inputs: ScanInputs) -> int:
        return min(inputs.budget.batch, len(inputs.optimise)) if inputs.optimise is not None else inputs.budget.batch

    def run(self, inputs: ScanInputs, callback: Callback | None = None) -> DetectorReport:
        model, optimise, held = inputs.model, inputs.optimise, inputs.held
        if optimise is None or held is None:
            raise ValueError(f"the {self.name} detector needs clean images")  # the job checks this first
        family, num_classes = self.family, model.spec.num_classes
        chunk = inputs.chunk(self.images_per_class(inputs), num_classes)
        piece = self.images_per_forward(inputs)
        rev = reverse_triggers(
            model,
            optimise.images,
            optimise.labels,
            list(range(num_classes)),
            inputs.budget,
            seed=inputs.seed,
            precision=inputs.precision,
            callback=callback,
            family=family,
            chunk=chunk,
            ranks=inputs.ranks,
            images_per_forward=piece,
        )
        # A class that never reached the success level keeps the size it stopped at: a lower bound of what it
        # needs, which makes the others look less anomalous, never more; it cannot be flagged itself.
        # With the screened schedule the classes the screen stopped are compared at their projected full-budget size
        # (cleanse/scan/reverse.py, projected_sizes); otherwise these are the sizes reached.
        sizes, shrink = projected_sizes(rev)
        index = anomaly_index(sizes, inputs.scale, inputs.statistic)
        mad = anomaly_index(sizes, inputs.scale, "mad")
        linear = anomaly_index(sizes, "linear", "mad")  # Neural Cleanse's own figure, for comparison
        flagged = [k for k in flag_small(sizes, inputs.threshold, inputs.scale, inputs.statistic) if rev.reached[k]]
        small = small_side(sizes, inputs.scale, inputs.statistic)
        shape = model.spec.input_size
        tensors = [rev.trigger_tensors(k) for k in range(num_classes)]
        triggers = {k: family.trigger(tensors[k], k, shape, inputs.budget_name) for k in range(num_classes)}
        measured = _held_out_figures(inputs, held, triggers)
        pictures = [family.pictures(t) for t in tensors]
        rows = []
        for k in range(num_classes):
            hit_rate, tar, tar_median = (None if math.isnan(v) else v for v in measured[k].tolist())
            rows.append(
                {
                    "index": k,
                    "statistic": float(sizes[k]),
                    "score": float(index[k]),
                    "flagged": k in flagged,
                    "small_side": bool(small[k]),
                    family.size_name: float(rev.size[k]),
                    "reached_success": bool(rev.reached[k]),
                    "anomaly_index": float(index[k]),
                    "anomaly_index_mad": float(mad[k]),
                    "anomaly_index_linear": float(linear[k]),
                    "attack_success_rate": hit_rate,
                    "optimisation_success": float(rev.success[k]),
                    "steps_run": int(rev.steps_run[k]),
                    "screened_out": None if rev.screened_out is None else bool(rev.screened_out[k]),
                    "size_at_screen": None if rev.screen_size is None else _finite(rev.screen_size[k]),
                    "tested_size": float(sizes[k]),
                    "tar": tar,
                    "tar_median": tar_median,
                    "trigger_file": None,
                }
            )
        doc = {
            "family": family.name,
            "trigger_kind": family.kind,
            "size_unit": family.size_unit,
            "test": inputs.statistic,
            "scale": inputs.scale,
            "threshold": inputs.threshold,
            "success_level": family.success,
            "budget": inputs.budget_name,
            "steps": inputs.budget.steps,
            "batch": inputs.budget.batch,
            "early_stop_rounds": inputs.budget.early_stop,
            "schedule": "screened" if inputs.budget.screen_steps else "every",
            "screen_steps": inputs.budget.screen_steps or None,
            "kept_after_screen": inputs.budget.kept_classes(num_classes) if inputs.budget.screen_steps else None,
            "screened_out": None if rev.screened_out is None else int(rev.screened_out.sum()),
            "log_shrink": shrink,
            "chunk_classes": chunk,  # classes per forward at most (the memory budget's)
            "images_per_class": self.images_per_class(inputs),
            "images_per_forward": piece,  # of one class: fewer when a class is cut
            "steps_run_total": int(rev.steps_run.sum()),
            f"median_{family.size_name}": float(rev.size.double().quantile(0.5)),
            "seconds": rev.seconds,
        }
        return DetectorReport(
            self.name,
            "anomaly_index",
            family.size_name,
            rows,
            flagged,
            doc,
            triggers,
            pictures,
            family.picture_labels,
            rev.history,
        )


for _family in (PATCH, ADDITIVE, WARP):
    DETECTORS.register(_family.name)(ReversalDetector(_family))


def _held_out_figures(inputs: ScanInputs, held: Dataset, triggers: dict[int, Trigger]) -> torch.Tensor:
    """(K, 3) float32 per class: its trigger's attack success on the held-out images of the other classes, TAR and
    TAR median (NaN where undefined). Each rank measures its block of classes; the rows are gathered."""
    model, count = inputs.model, len(triggers)
    figures = []
    for k in class_block(count, inputs.ranks):
        trig = triggers[k]
        hits = predict(model, trig.apply_uint8(held.images[held.labels != k]), precision="fp32") == k
        tar: dict[str, Any] = {}
        if inputs.layer is not None and trig.region_mask() is not None:
            tar = measure_tar(model, held.images, held.labels, trig, inputs.layer, with_clean=False)
        figures.append([float(hits.float().mean()) if len(hits) else None, tar.get("tar"), tar.get("tar_median")])
    device = next(model.parameters()).device
    rows = torch.tensor([[math.nan if v is None else v for v in row] for row in figures], device=device)
    return gather_rows(rows.view(-1, 3), count, inputs.ranks).cpu()


def _finite(value: torch.Tensor) -> float | None:
    return float(value) if bool(torch.isfinite(value)) else None
