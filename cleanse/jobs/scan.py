"""The scan job: run the chosen detectors, combine their verdicts, and/or rank training samples by suspicion.

Under torchrun every rank runs the detectors on its block of classes and gathers every class's results
(cleanse/engine/distributed.py), so every rank reaches the same verdict; rank 0 alone reports, runs the data audit
and writes the output folder. docs/scaling.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cleanse.data import Dataset, load_data, save_dataset
from cleanse.data.subset import clean_subset
from cleanse.engine.device import resolve_precision
from cleanse.engine.distributed import Ranks, current
from cleanse.engine.memory import MemoryPlan, format_bytes, is_out_of_memory, parse_memory, plan_memory
from cleanse.errors import CleanseError
from cleanse.files import atomic_directory, check_output, check_output_folder, output_set, write_json_atomic
from cleanse.jobs.inputs import RunSettings, check_classes, load_clean, load_job_model, tar_layer_for
from cleanse.jobs.progress import SILENT, Progress
from cleanse.models import ModelOptions
from cleanse.record import describe_input, new_record, versions
from cleanse.scan import BUDGETS, Budget, audit_data
from cleanse.scan.anomaly import DEFAULT_THRESHOLDS, SCALES, STATISTICS
from cleanse.scan.audit import Audit
from cleanse.scan.detectors import DETECTORS, DetectorReport, ScanInputs
from cleanse.scan.verdict import combine, corroborates
from cleanse.viz import image_grid, save_png

HOLD_OUT = 0.2  # share of the clean images held out to measure the reversed triggers
DEFAULT_N_CLEAN = 500
SHEET_CLASSES = 24  # sheet.png's rows: every class up to this many, else the flagged and the most suspicious
N_CLEAN_PER_CLASS = 3  # the default grows with the class count: at least 2 per class must survive the hold-out
SCHEDULES = ("auto", "every", "screened")  # docs/commands/scan.md, "Screened schedule"
# `auto` screens budgets of at least this many steps: the 150-step screen of `full` gave the full schedule's verdict on
# all 12 kept CIFAR-10 models; the 50-step screen of `fast` stopped the synthetic BadNets model's target before any
# class had a working trigger (tests/test_scan.py), so shorter budgets give every class all of it.
AUTO_SCREEN_STEPS = 600


@dataclass
class ScanOptions:
    model_path: str
    model: ModelOptions | None = None  # what a raw state dict lacks
    data: str | None = None  # clean DATA to reverse triggers from
    n_clean: int | None = None  # default: DEFAULT_N_CLEAN, or N_CLEAN_PER_CLASS per class when that is more
    budget: str = "full"
    steps: int | None = None  # overrides the budget's steps
    early_stop: bool = True
    statistic: str = "loo-z"
    threshold: float | None = None  # default per statistic
    scale: str = "log"
    layer: str | None = None
    audit_data: str | None = None  # training DATA whose poisoned rows are sought
    poison_rate: float | None = None
    detectors: list[str] | None = None  # default: every detector the inputs allow
    alpha: float = 0.05  # level of the p-value detectors (MM-BD)
    output: Path | None = None  # default <model stem>.scan
    precision: str = "auto"
    no_cache: bool = False
    memory_budget: str | int | None = None  # bytes one optimisation step may take ('4GiB'); default: free memory x 0.5
    write_clean: Path | None = None  # with audit_data: a copy of it without the flagged rows
    # auto | every | screened (reverse-engineering: a screen first, then the full budget for the most suspicious
    # classes; or every class the full budget). auto: screened for budgets of AUTO_SCREEN_STEPS steps or more.
    schedule: str = "auto"


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


def _detectors(o: ScanOptions) -> list[str]:
    """The detectors to run: those asked for, or every one the inputs allow (none when only --audit-data)."""
    if o.detectors is None:
        if o.data is None and o.audit_data is not None:
            return []
        return [n for n in DETECTORS if o.data is not None or not DETECTORS.get(n).needs_data]
    names = list(dict.fromkeys(o.detectors))
    for name in names:
        detector = DETECTORS.get(name)  # an unknown name fails with the list of known ones
        if detector.needs_data and o.data is None:
            raise CleanseError(
                f"the {name} detector reverse-engineers triggers from clean images; pass --data CLEAN_DATA or "
                f"choose data-free detectors ({', '.join(n for n in DETECTORS if not DETECTORS.get(n).needs_data)})"
            )
    if not names:
        raise CleanseError(f"--detectors is empty; choose from: {', '.join(DETECTORS)}")
    return names


def _plan(o: ScanOptions) -> tuple[Budget, float, list[str], int | None]:
    """The checked budget, threshold, detectors and memory budget: usage errors before any file is read."""
    if o.budget not in BUDGETS:
        raise CleanseError(f"--budget {o.budget!r} is unknown; choose one of: {', '.join(BUDGETS)}")
    plan = BUDGETS[o.budget] if o.steps is None else replace(BUDGETS[o.budget], steps=o.steps)
    plan = plan if o.early_stop else replace(plan, early_stop=0)
    if plan.steps < plan.round_steps:
        raise CleanseError(f"--steps {o.steps} is too few; give at least {plan.round_steps}")
    if o.schedule not in SCHEDULES:
        raise CleanseError(f"--schedule {o.schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
    if o.schedule == "screened" or (o.schedule == "auto" and plan.steps >= AUTO_SCREEN_STEPS):
        if plan.steps < 4 * plan.round_steps:
            raise CleanseError(
                f"--schedule screened needs at least {4 * plan.round_steps} steps (a screen of a quarter of them); "
                "raise --steps or use --schedule every"
            )
        plan = plan.screened()
    if o.n_clean is not None and o.n_clean < 1:
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
    if not 0 < o.alpha < 1:
        raise CleanseError(f"--alpha {o.alpha} must lie in (0, 1); MM-BD uses 0.05")
    if o.poison_rate is not None and not 0 < o.poison_rate < 1:
        raise CleanseError(f"--poison-rate {o.poison_rate} must lie in (0, 1)")
    if o.write_clean is not None:
        if o.audit_data is None:
            raise CleanseError("--write-clean writes a cleaned copy of the --audit-data set; pass --audit-data DATA")
        if o.write_clean.suffix != ".safetensors":
            raise CleanseError(
                f"--write-clean {o.write_clean}: the cleaned copy is a dataset file; give it a .safetensors name"
            )
    memory_budget = None if o.memory_budget is None else parse_memory(o.memory_budget)
    return plan, threshold, _detectors(o), memory_budget


def scan(options: ScanOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> ScanResult:
    o, s = options, settings or RunSettings()
    started = time.perf_counter()
    plan, threshold, names, memory_budget = _plan(o)
    output = o.output or Path(o.model_path).with_name(Path(o.model_path).stem + ".scan")
    inputs = (o.model_path, o.data, o.audit_data)
    check_output_folder(output, force=s.force, inputs=inputs)
    if o.write_clean is not None:
        if output.resolve() in o.write_clean.resolve().parents:
            raise CleanseError(
                f"--write-clean {o.write_clean} lies inside the output folder {output}, which is replaced as a whole; "
                "choose a path outside it"
            )
        check_output(o.write_clean, force=s.force, inputs=inputs)
    dev = s.rank_device()
    ranks = current()
    if not ranks.main:  # one live table, one set of notes: rank 0's
        progress = SILENT
    prec = resolve_precision(o.precision, dev)
    if prec == "fp16":  # the scan optimises inputs with unscaled gradients, which fp16 would underflow
        prec = "fp32"
    model = load_job_model(o.model_path, o.model, dev, progress)
    _, height, width = model.spec.input_size
    n_clean = o.n_clean or max(DEFAULT_N_CLEAN, N_CLEAN_PER_CLASS * model.spec.num_classes)
    measure_layer = None
    if "patch" in names or o.layer is not None:  # patch triggers are the only ones with a region for TAR
        measure_layer = tar_layer_for(model, o.layer, progress)

    doc: dict[str, Any] = {"model": o.model_path, "model_sha256": model.source_sha256}
    reports: dict[str, DetectorReport] = {}
    if names:
        if model.spec.num_classes < 3:
            raise CleanseError(f"the model has {model.spec.num_classes} classes; the anomaly test needs at least 3")
        _check_ranks(model.spec.num_classes, ranks)
        split = None
        if o.data is not None:
            clean, dropped = load_clean(o.data, "test", o.no_cache, (height, width), model.spec.preprocess)
            check_classes(model, clean, o.data)
            split = clean_subset(clean, n=n_clean, seed=s.seed, hold_back=HOLD_OUT, n_flag="--n-clean")
            doc.update(
                n_clean=len(split.train) + len(split.held),
                n_optimise=len(split.train),
                n_held_out=len(split.held),
                rows_dropped_as_poisoned=dropped,
            )
        try:
            memory = plan_memory(model, model.spec.input_size, prec, memory_budget)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise CleanseError(
                f"out of memory on {dev} before the scan began (measuring one image's cost); free memory on the "
                "device or choose another --device"
            ) from None
        doc["memory"] = memory.to_json()
        scan_inputs = ScanInputs(
            model,
            split.train if split else None,
            split.held if split else None,
            o.budget,
            plan,
            s.seed,
            prec,
            measure_layer,
            o.statistic,
            o.scale,
            threshold,
            o.alpha,
            memory,
            ranks,
        )
        for name in names:
            detector = DETECTORS.get(name)
            progress.note(f"{name}: {detector.summary}")
            try:
                with progress.loop(detector.loop_kind, f"scan: {name}") as callback:
                    reports[name] = detector.run(scan_inputs, callback)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                images = detector.images_per_class(scan_inputs)
                chunk = scan_inputs.chunk(images, model.spec.num_classes)
                piece = detector.images_per_forward(scan_inputs) if detector.cuts_batches else None
                raise CleanseError(out_of_memory(str(dev), name, memory, chunk, images, piece)) from None
        doc.update(_verdict_doc(model.spec.classes, reports, o, plan, threshold, measure_layer))
    audit = cleaned = None
    if o.audit_data is not None and ranks.main:  # not split over the ranks: rank 0 alone audits, and writes
        suspect = load_data(
            o.audit_data,
            split="train",
            cache=not o.no_cache,
            image_size=(height, width),
            preprocess=model.spec.preprocess,
        )
        check_classes(model, suspect, o.audit_data)
        rate = o.poison_rate if o.poison_rate is not None else (suspect.meta.get("attack") or {}).get("rate")
        progress.note(f"auditing {len(suspect)} samples of {o.audit_data} (per-class split test + spectral signature)")
        audit = audit_data(model, suspect, rate, prec)
        doc["audit"] = {k: v for k, v in audit.doc.items() if k != "ranking"} | {
            "file": "audit.json",
            "top": audit.doc["ranking"][:20],
        }
        if o.write_clean is not None:
            cleaned = _cleaned_copy(suspect, audit, o)
            doc["audit"]["cleaned_copy"] = {"file": str(o.write_clean), **cleaned.meta["audit"]}
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
            "detectors": names,
            "n_clean": n_clean,
            "budget": o.budget,
            "steps": plan.steps,
            "early_stop_rounds": plan.early_stop,
            "schedule": plan.schedule,
            "statistic": o.statistic,
            "threshold": threshold,
            "scale": o.scale,
            "alpha": o.alpha,
            "seed": s.seed,
            "tar_layer": measure_layer,
            "precision": prec,
            "poison_rate": o.poison_rate,
            "memory_budget": memory_budget,
            "write_clean": None if o.write_clean is None else str(o.write_clean),
            "ranks": ranks.world,  # torchrun processes, each scanning a block of the classes
        },
        result="scan.json",
        verdict={"backdoored": doc.get("backdoored"), "suspected_targets": doc.get("suspected_targets")},
        history=[row for r in reports.values() for row in r.history],
        versions=versions(dev),
        timings={"wall_seconds": wall, **{f"{n}_seconds": r.doc["seconds"] for n, r in reports.items()}},
    )
    if cleaned is not None:
        record["outputs"] = {"cleaned_data": str(o.write_clean), "rows": len(cleaned)}
    if ranks.main:  # the other ranks hold the same verdict
        with output_set() as files:  # the cleaned copy is renamed into place only once the folder is
            if cleaned is not None and o.write_clean is not None:
                save_dataset(cleaned, files.reserve(o.write_clean))
            with atomic_directory(output, force=s.force, inputs=inputs) as folder:
                _write_triggers(folder, model.spec.classes, reports, doc)
                if audit is not None:
                    write_json_atomic(folder / "audit.json", audit.doc)
                write_json_atomic(folder / "scan.json", doc)
                write_json_atomic(folder / "run.json", record)
    reversed_any = any(r.triggers for r in reports.values())
    return ScanResult(doc, output, reversed_any, audit is not None)


def _check_ranks(num_classes: int, ranks: Ranks) -> None:
    """Every rank needs a class of its own to scan."""
    if ranks.world > num_classes:
        raise CleanseError(
            f"scan splits the model's {num_classes} classes over {ranks.world} torchrun ranks, which leaves some rank "
            f"without a class; start at most {num_classes} processes"
        )


def out_of_memory(
    device: str, detector: str, memory: MemoryPlan, chunk: int, images: int, piece: int | None = None
) -> str:
    """The one line a scan that ran out of memory exits 2 with: what ran out, and the option that lowers it. `piece`:
    one class's images per forward for a detector that can cut a class's batch (None: it cannot)."""
    sliced = f", in slices of {piece}" if piece is not None and piece < images else ""
    where = (
        f"out of memory on {device} in the {detector} detector ({chunk} class(es) x {images} images per step{sliced}"
    )
    budget = f"memory budget {format_bytes(memory.budget)} from {memory.source}"
    if chunk > 1 or (piece is not None and piece > 1):
        smaller = f"{max(1, memory.forward_budget // 4 // 2**20)}MiB"  # a CPU's forward is already below the budget
        return f"{where}, {budget}); pass a smaller --memory-budget, e.g. --memory-budget {smaller}"
    least = "one class per step" if piece is None else "one image per forward"
    return (
        f"{where}, {least} already, {budget}): a smaller --memory-budget cannot go below that; "
        "free memory on the device or scan on another --device"
    )


def _cleaned_copy(data: Dataset, audit: Audit, o: ScanOptions) -> Dataset:
    """The audited set without the flagged rows, as the audit read it (at the model's input size), with a note of
    what was removed in its metadata; ground-truth columns are kept for the rows that stay."""
    keep = (~audit.flagged).nonzero().flatten()
    cleaned = data.subset(keep)
    empty = [c for c in range(data.num_classes) if not bool((cleaned.labels == c).any())]
    cleaned.meta["audit"] = {
        "source": o.audit_data,
        "model": o.model_path,
        "rows_before": len(data),
        "rows_removed": len(data) - len(keep),
        "flagged_classes": audit.doc["flagged_classes"],
        "empty_classes": empty,  # a class the audit flagged whole: training on the copy needs one image of each
    }
    if data.poisoned is not None:
        cleaned.meta["audit"]["poisoned_rows_left"] = int(cleaned.poisoned.sum()) if cleaned.poisoned is not None else 0
    return cleaned


def _verdict_doc(
    classes: list[str],
    reports: dict[str, DetectorReport],
    o: ScanOptions,
    plan: Budget,
    threshold: float,
    layer: str | None,
) -> dict[str, Any]:
    """scan.json's verdict part: the combined verdict, each detector's evidence, and one summary row per class."""
    reversal = {n for n in reports if DETECTORS.get(n).needs_data}
    verdict = combine(reports, reversal)
    for k in verdict["suspected_targets"]:  # each family's reversed trigger that flags or corroborates the target
        for name in reversal:
            evidence = reports[name].classes[k]
            if evidence["flagged"] or corroborates(evidence):
                evidence["trigger_file"] = trigger_file(k, name)
    rows = []
    for k, class_name in enumerate(classes):
        row: dict[str, Any] = {
            "index": k,
            "name": class_name,
            "flagged": str(k) in verdict["evidence"],
            "flagged_by": verdict["evidence"].get(str(k), []),
        }
        for name, r in reports.items():
            c = r.classes[k]
            row[name] = {"statistic": c["statistic"], "score": c["score"], "flagged": c["flagged"]}
            if "reached_success" in c:  # a reversal that never worked within the budget: its size is a lower bound
                row[name]["reached"] = c["reached_success"]
        rows.append(row)
    return {
        **verdict,
        "detectors_run": list(reports),
        "statistic": o.statistic,
        "threshold": threshold,
        "scale": o.scale,
        "alpha": o.alpha,
        "budget": o.budget,
        "steps": plan.steps,
        "batch": plan.batch,
        "early_stop_rounds": plan.early_stop,
        "schedule": plan.schedule,
        "screen_steps": plan.screen_steps or None,
        "tar_layer": layer,
        "classes": rows,
        "detectors": {n: r.to_json() for n, r in reports.items()},
    }


def trigger_file(k: int, family: str) -> str:
    return f"trigger-{k}-{family}.safetensors"


def sheet_classes(num_classes: int, reports: dict[str, DetectorReport], flagged: set[int]) -> list[int]:
    """The classes sheet.png shows, in class order: all of them up to SHEET_CLASSES, else SHEET_CLASSES of them, the
    flagged ones first, then the most suspicious (largest small-side anomaly index over the reversal detectors).
    Every class keeps its own class-<k>-<family>.png."""
    if num_classes <= SHEET_CLASSES:
        return list(range(num_classes))

    def suspicion(k: int) -> float:
        signed = [
            (r.classes[k]["score"] if r.classes[k].get("small_side") else -r.classes[k]["score"])
            for r in reports.values()
        ]
        return max((v for v in signed if v == v), default=-math.inf)  # v == v drops NaN

    ranked = sorted(range(num_classes), key=lambda k: (k not in flagged, -suspicion(k), k))
    return sorted(ranked[:SHEET_CLASSES])


def _write_triggers(folder: Path, classes: list[str], reports: dict[str, DetectorReport], doc: dict[str, Any]) -> None:
    """Per class and family class-<k>-<family>.png, one labelled sheet.png, and a trigger file per flagged pair."""
    with_pictures = {n: r for n, r in reports.items() if r.pictures}
    if not with_pictures:
        return
    for name, r in with_pictures.items():
        for k, pics in enumerate(r.pictures):
            save_png(image_grid([pics], scale=6, col_labels=list(r.picture_labels)), folder / f"class-{k}-{name}.png")
            if r.classes[k]["trigger_file"]:
                r.triggers[k].save(folder / r.classes[k]["trigger_file"])
    flagged = {int(k): v for k, v in doc["evidence"].items()}
    shown = sheet_classes(len(classes), with_pictures, set(flagged))
    rows = [torch.cat([r.pictures[k] for r in with_pictures.values()]) for k in shown]
    headings = [f"{n}: {label}" for n, r in with_pictures.items() for label in r.picture_labels]
    row_labels = [f"{k} {classes[k]}" + (f"\nflagged: {', '.join(flagged[k])}" if k in flagged else "") for k in shown]
    which = (
        ""
        if len(shown) == len(classes)
        else f"{len(shown)} of {len(classes)} classes (flagged, then the most suspicious), "
    )
    title = (
        f"reversed triggers, {which}one family per column group ("
        + ", ".join(f"{n}: {r.doc['size_unit']}" for n, r in with_pictures.items())
        + ")"
    )
    save_png(image_grid(rows, scale=4, col_labels=headings, row_labels=row_labels, title=title), folder / "sheet.png")
