"""The scan job: reverse a trigger per class and flag outliers, and/or rank training samples by suspicion."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cleanse.data import load_data
from cleanse.engine.device import resolve_precision
from cleanse.engine.gradcam import resolve_layer, tar_layer
from cleanse.errors import CleanseError
from cleanse.files import atomic_directory, check_output_folder, write_json_atomic
from cleanse.jobs.inputs import RunSettings, check_classes, load_clean, load_job_model
from cleanse.jobs.progress import SILENT, Progress
from cleanse.models import ModelOptions
from cleanse.record import describe_input, new_record, versions
from cleanse.scan import BUDGETS, Budget, ModelScan, audit_data, scan_model
from cleanse.scan.anomaly import DEFAULT_THRESHOLDS, SCALES, STATISTICS
from cleanse.scan.neural_cleanse import mask_pictures
from cleanse.viz import image_grid, save_png


@dataclass
class ScanOptions:
    model_path: str
    model: ModelOptions | None = None  # what a raw state dict lacks
    data: str | None = None  # clean DATA to reverse triggers from
    n_clean: int = 500
    budget: str = "full"
    steps: int | None = None  # overrides the budget's steps
    early_stop: bool = True
    statistic: str = "loo-z"
    threshold: float | None = None  # default per statistic
    scale: str = "log"
    layer: str | None = None
    audit_data: str | None = None  # training DATA whose samples are ranked
    poison_rate: float | None = None
    output: Path | None = None  # default <model stem>.scan
    precision: str = "auto"
    no_cache: bool = False


@dataclass
class ScanResult:
    doc: dict[str, Any]  # scan.json (and what --json prints)
    output: Path
    reversed_triggers: bool  # the folder holds class-*.png, sheet.png and trigger files
    audited: bool  # the folder holds audit.json

    def to_json(self) -> dict[str, Any]:
        return self.doc

    @property
    def backdoored(self) -> bool:
        return bool(self.doc.get("backdoored"))


def _plan(o: ScanOptions) -> tuple[Budget, float]:
    """The checked budget and threshold: usage errors before any file is read."""
    if o.data is None and o.audit_data is None:
        raise CleanseError(
            "scan needs --data CLEAN_DATA (trigger reverse-engineering) and/or --audit-data TRAINING_DATA "
            "(sample ranking)"
        )
    if o.budget not in BUDGETS:
        raise CleanseError(f"--budget {o.budget!r} is unknown; choose one of: {', '.join(BUDGETS)}")
    plan = BUDGETS[o.budget] if o.steps is None else replace(BUDGETS[o.budget], steps=o.steps)
    plan = plan if o.early_stop else replace(plan, early_stop=0)
    if plan.steps < plan.round_steps:
        raise CleanseError(f"--steps {o.steps} is too few; give at least {plan.round_steps}")
    if o.n_clean < 1:
        raise CleanseError("--n-clean must be a positive number of images")
    if o.scale not in SCALES:
        raise CleanseError(f"--scale {o.scale!r} is unknown; choose one of: {', '.join(SCALES)}")
    if o.statistic not in STATISTICS:
        raise CleanseError(f"--statistic {o.statistic!r} is unknown; choose one of: {', '.join(STATISTICS)}")
    threshold = DEFAULT_THRESHOLDS[o.statistic] if o.threshold is None else o.threshold
    if not threshold > 0 or threshold == float("inf"):
        raise CleanseError(
            f"--threshold {threshold} must be positive (default 3.5 for loo-z, 3 for mad; "
            "Neural Cleanse uses mad, linear, 2)"
        )
    if o.poison_rate is not None and not 0 < o.poison_rate < 1:
        raise CleanseError(f"--poison-rate {o.poison_rate} must lie in (0, 1)")
    return plan, threshold


def scan(options: ScanOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> ScanResult:
    o, s = options, settings or RunSettings()
    started = time.perf_counter()
    plan, threshold = _plan(o)
    output = o.output or Path(o.model_path).with_name(Path(o.model_path).stem + ".scan")
    inputs = (o.model_path, o.data, o.audit_data)
    check_output_folder(output, force=s.force, inputs=inputs)
    dev = s.torch_device()
    prec = resolve_precision(o.precision, dev)
    model = load_job_model(o.model_path, o.model, dev, progress)
    _, height, width = model.spec.input_size
    measure_layer = o.layer or tar_layer(model, model.spec.input_size)
    resolve_layer(model, measure_layer)

    doc: dict[str, Any] = {"model": o.model_path, "model_sha256": model.source_sha256}
    result: ModelScan | None = None
    if o.data is not None:
        if model.spec.num_classes < 3:
            raise CleanseError(f"the model has {model.spec.num_classes} classes; the anomaly test needs at least 3")
        clean, dropped = load_clean(o.data, "test", o.no_cache, (height, width))
        check_classes(model, clean, o.data)
        progress.note(
            f"reversing a trigger for each of {model.spec.num_classes} classes at once ({o.budget}: "
            f"{plan.steps} steps) from {min(o.n_clean, len(clean))} clean images of {o.data}"
        )
        with progress.loop("scan", f"scan {o.budget}") as callback:
            result = scan_model(
                model,
                clean,
                o.n_clean,
                o.budget,
                plan,
                threshold,
                s.seed,
                prec,
                measure_layer,
                callback=callback,
                scale=o.scale,
                statistic=o.statistic,
            )
        doc.update(result.doc)
        doc["rows_dropped_as_poisoned"] = dropped
        for k in result.doc["suspected_targets"]:
            doc["classes"][k]["trigger_file"] = f"trigger-{k}.safetensors"
    audit = None
    if o.audit_data is not None:
        suspect = load_data(o.audit_data, split="train", cache=not o.no_cache, image_size=(height, width))
        check_classes(model, suspect, o.audit_data)
        rate = o.poison_rate if o.poison_rate is not None else (suspect.meta.get("attack") or {}).get("rate")
        progress.note(f"auditing {len(suspect)} samples of {o.audit_data} (spectral signature + activation clustering)")
        audit = audit_data(model, suspect, rate, prec)
        doc["audit"] = {k: v for k, v in audit.items() if k != "ranking"} | {
            "file": "audit.json",
            "top": audit["ranking"][:20],
        }
    wall = time.perf_counter() - started
    doc["wall_seconds"] = wall
    record = new_record(
        "scan",
        inputs={
            "model": describe_input(o.model_path),
            "data": describe_input(o.data),
            "audit_data": describe_input(o.audit_data),
        },
        parameters={
            "n_clean": o.n_clean,
            "budget": o.budget,
            "steps": plan.steps,
            "early_stop_rounds": plan.early_stop,
            "statistic": o.statistic,
            "threshold": threshold,
            "scale": o.scale,
            "seed": s.seed,
            "tar_layer": measure_layer,
            "precision": prec,
            "poison_rate": o.poison_rate,
        },
        result="scan.json",
        verdict={"backdoored": doc.get("backdoored"), "suspected_targets": doc.get("suspected_targets")},
        history=result.reversed.history if result else [],
        versions=versions(dev),
        timings={"wall_seconds": wall},
    )
    with atomic_directory(output, force=s.force, inputs=inputs) as folder:
        if result is not None:
            pictures = mask_pictures(result.reversed)
            for k, pics in enumerate(pictures):
                save_png(image_grid([pics], scale=6), folder / f"class-{k}.png")
            save_png(image_grid(pictures, scale=4), folder / "sheet.png")
            for k in result.doc["suspected_targets"]:
                result.triggers[k].save(folder / f"trigger-{k}.safetensors")
        if audit is not None:
            write_json_atomic(folder / "audit.json", audit)
        write_json_atomic(folder / "scan.json", doc)
        write_json_atomic(folder / "run.json", record)
    return ScanResult(doc, output, result is not None, audit is not None)
