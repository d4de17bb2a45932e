"""The report job: run records -> report.json, report.md and one self-contained report.html."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cleanse.attacks import load_trigger
from cleanse.engine.measure import measure
from cleanse.errors import CleanseError
from cleanse.files import atomic_directory, check_output_folder, write_bytes_atomic, write_json_atomic
from cleanse.jobs.inputs import RunSettings, check_classes, load_clean, load_job_model, tar_layer_for
from cleanse.jobs.progress import SILENT, Progress
from cleanse.models import ModelOptions, load_model
from cleanse.record import describe_input, new_record, versions
from cleanse.report.build import build, resolve_sources
from cleanse.report.collect import Record, find_records
from cleanse.report.figures import anomaly_plot, before_after_sheet, history_plot
from cleanse.report.render import to_html, to_markdown

FORMATS = ("html", "md", "json")


@dataclass
class ReportOptions:
    inputs: list[str] = field(default_factory=list)  # run records or folders of them
    output: Path = Path("report")
    formats: str = "html,md,json"  # comma-separated; report.json is always written
    model_path: str | None = None  # evaluate this model directly
    model: ModelOptions | None = None  # what a raw --model state dict lacks
    data: str | None = None  # clean DATA for --model
    trigger: Path | None = None  # trigger for --model's ASR/RA/TAR
    n: int = 8  # images per Grad-CAM before/after sheet
    no_cache: bool = False


@dataclass
class ReportResult:
    doc: dict[str, Any]  # report.json (and what --json prints)
    output: Path
    records: int
    formats: set[str]

    def to_json(self) -> dict[str, Any]:
        return self.doc

    @property
    def main_file(self) -> Path:
        return self.output / ("report.html" if "html" in self.formats else "report.json")


def _formats(o: ReportOptions) -> set[str]:
    wanted = {f.strip() for f in o.formats.split(",") if f.strip()}
    if not wanted or wanted - set(FORMATS):
        raise CleanseError(f"--format {o.formats!r}: choose from {', '.join(FORMATS)}, comma-separated")
    if not o.inputs and o.model_path is None:
        raise CleanseError(
            "give run records or folders (INPUT...), or --model M --data D [--trigger T] to evaluate a model directly"
        )
    if o.model_path is not None and o.data is None:
        raise CleanseError("--model needs --data: the clean images to evaluate it on")
    if o.n < 1:
        raise CleanseError("--n must be at least 1")
    return wanted


def report(options: ReportOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> ReportResult:
    o, s = options, settings or RunSettings()
    started = time.perf_counter()
    wanted = _formats(o)
    records = find_records(list(o.inputs))
    if o.inputs and not records:
        raise CleanseError(
            f"no run records in {', '.join(o.inputs)}; pass the .run.json or run.json files that cleanse commands wrote"
        )
    guarded = (*o.inputs, o.model_path, o.data, str(o.trigger) if o.trigger else None)
    check_output_folder(o.output, force=s.force, inputs=guarded)
    dev = s.torch_device()
    doc = build(records)
    pictures: dict[str, Any] = {}
    with atomic_directory(o.output, force=s.force, inputs=guarded) as folder:
        if history_plot(doc["history"], folder / "history.png"):
            pictures["history"] = "history.png"
        _copy_scan_and_explain_pictures(doc, folder, pictures)
        sheets = _gradcam_sheets(records, doc, folder, pictures, o, dev, s.seed)
        if o.model_path is not None and o.data is not None:
            doc["direct"] = _direct(o, o.model_path, o.data, dev, progress)
            doc["missing"] = [m for m in doc["missing"] if m["section"] != "gradcam"]
        doc["images"] = pictures
        doc["gradcam"] = sheets
        write_json_atomic(folder / "report.json", doc)
        if "md" in wanted:
            write_bytes_atomic(folder / "report.md", to_markdown(doc).encode())
        if "html" in wanted:
            write_bytes_atomic(folder / "report.html", to_html(doc, folder).encode())
        record = new_record(
            "report",
            inputs={"records": [describe_input(r.path) for r in records], "model": describe_input(o.model_path)},
            parameters={"formats": sorted(wanted), "n": o.n},
            result="report.json",
            versions=versions(dev),
            timings={"wall_seconds": time.perf_counter() - started},
        )
        write_json_atomic(folder / "run.json", record)
    return ReportResult(doc, o.output, len(records), wanted)


def _copy_scan_and_explain_pictures(doc: dict[str, Any], folder: Path, pictures: dict[str, Any]) -> None:
    """Each scan's anomaly plot and sheet, and each explain sheet, copied into the report folder."""
    for i, scan in enumerate(s for s in doc["scan"] if s.get("classes")):
        suffix = "" if i == 0 else f"-{i}"
        scan["anomaly_images"] = {}
        for name, detector in scan["detectors"].items():
            if detector["score"] != "anomaly_index":
                continue
            rows = [{**c, "name": row["name"]} for c, row in zip(detector["classes"], scan["classes"], strict=True)]
            file = f"anomaly{suffix}-{name}.png"
            anomaly_plot(
                rows, detector.get("threshold") or scan["threshold"], folder / file, name, detector["statistic"]
            )
            pictures[file.removesuffix(".png")] = scan["anomaly_images"][name] = file
        if scan.get("sheet"):
            write_bytes_atomic(folder / f"scan-sheet{suffix}.png", Path(scan["sheet"]).read_bytes())
            pictures[f"scan-sheet{suffix}"] = scan["sheet_image"] = f"scan-sheet{suffix}.png"
    for i, ex in enumerate(doc["explain"]):
        if ex.get("sheet"):
            write_bytes_atomic(folder / f"explain-{i}.png", Path(ex["sheet"]).read_bytes())
            pictures[f"explain-{i}"] = f"explain-{i}.png"


def _gradcam_sheets(
    records: list[Record],
    doc: dict[str, Any],
    folder: Path,
    pictures: dict[str, Any],
    o: ReportOptions,
    dev: torch.device,
    seed: int,
) -> dict[str, Any]:
    """A before/after Grad-CAM sheet per unlearn record whose models and data still exist; the rest listed as
    missing."""
    sheets: dict[str, Any] = {}
    for r in [r for r in records if r.command == "unlearn"]:
        src = resolve_sources(r)
        key = f"gradcam-{(r.doc.get('parameters') or {}).get('method')}"
        if src["parent"] is None or src["cleaned"] is None or src["data"] is None:
            doc["missing"].append(
                {"section": key, "reason": f"the parent or cleaned model named in {r.path} no longer exists"}
            )
            continue
        try:
            before_model = load_model(src["parent"], device=dev)
            after_model = load_model(src["cleaned"], device=dev)
            trig = load_trigger(src["trigger"]) if src["trigger"] else None
            size = (before_model.spec.input_size[1], before_model.spec.input_size[2])
            clean, _ = load_clean(str(src["data"]), "test", o.no_cache, size, before_model.spec.preprocess)
        except CleanseError as exc:  # e.g. a raw parent that needs --arch: state it, keep the rest of the report
            doc["missing"].append({"section": key, "reason": exc.message})
            continue
        sheets[key] = before_after_sheet(before_model, after_model, clean, trig, o.n, folder / f"{key}.png", seed)
        pictures[key] = f"{key}.png"
    return sheets


def _direct(o: ReportOptions, model_path: str, data: str, dev: torch.device, progress: Progress) -> dict[str, Any]:
    """--model evaluated directly on --data (and --trigger)."""
    model = load_job_model(model_path, o.model, dev, progress)
    _, height, width = model.spec.input_size
    clean, dropped = load_clean(data, "test", o.no_cache, (height, width), model.spec.preprocess)
    check_classes(model, clean, data)
    trig = load_trigger(o.trigger) if o.trigger else None
    if trig is not None:
        trig.check_size(*model.spec.input_size, what="the model's inputs")
    layer = tar_layer_for(model, None, progress) if trig is not None else None
    return {
        "model": model_path,
        "model_sha256": model.source_sha256,
        "data": data,
        "trigger": str(o.trigger) if o.trigger else None,
        "rows_dropped_as_poisoned": dropped,
        "tar_layer": layer,
        "metrics": measure(model, clean, trig, layer),
    }
