"""`cleanse report`: run records -> report.json, report.md and one self-contained report.html."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cleanse.attacks import load_trigger
from cleanse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, NoCacheOpt, QuietOpt, SeedOpt, emit_json, say, start
from cleanse.cli.model_opts import (ArchArgOpt, ArchOpt, ClassesOpt, InputSizeOpt, MeanOpt, NumClassesOpt, PresetOpt, StdOpt,
                                    load_cli_model)
from cleanse.cli.train import check_classes, load_clean
from cleanse.engine.device import resolve_device
from cleanse.engine.gradcam import tar_layer
from cleanse.errors import CleanseError
from cleanse.files import atomic_directory, check_output_folder, write_bytes_atomic, write_json_atomic
from cleanse.models import load_model
from cleanse.record import describe_input, new_record, versions
from cleanse.report.build import build, resolve_sources
from cleanse.report.collect import find_records
from cleanse.report.figures import anomaly_plot, before_after_sheet, history_plot
from cleanse.report.render import to_html, to_markdown

FORMATS = ("html", "md", "json")


def report_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(metavar="[INPUT]...", help="Run records (*.run.json, run.json) or folders of them.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json, report.md, report.html and the PNGs.")] = Path("report"),
    formats: Annotated[str, typer.Option("--format", help="Comma-separated: html, md, json (report.json is always written).")] = "html,md,json",
    model: Annotated[Optional[str], typer.Option("--model", help="Evaluate this model directly (no run record needed).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Clean DATA for --model's evaluation.")] = None,
    trigger: Annotated[Optional[Path], typer.Option("--trigger", help="Trigger file for --model's ASR/RA/TAR.")] = None,
    n: Annotated[int, typer.Option("--n", help="Images per Grad-CAM before/after sheet.")] = 8,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    preset: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Build one report from run records (train, scan, unlearn, explain), or evaluate --model directly."""
    start(debug=debug, quiet=quiet, json_out=json_out)
    started = time.perf_counter()
    wanted = {f.strip() for f in formats.split(",") if f.strip()}
    if not wanted or wanted - set(FORMATS):
        raise CleanseError(f"--format {formats!r}: choose from {', '.join(FORMATS)}, comma-separated")
    if not inputs and model is None:
        raise CleanseError("give run records or folders (INPUT...), or --model M --data D [--trigger T] to evaluate a model directly")
    if model is not None and data is None:
        raise CleanseError("--model needs --data: the clean images to evaluate it on")
    if n < 1:
        raise CleanseError("--n must be at least 1")
    records = find_records(list(inputs or []))
    if inputs and not records:
        raise CleanseError(f"no run records in {', '.join(inputs)}; pass the .run.json or run.json files that cleanse commands wrote")
    guarded = (*(inputs or []), model, data, str(trigger) if trigger else None)
    check_output_folder(output, force=force, inputs=guarded)
    dev = resolve_device(device)
    doc = build(records)
    pictures: dict[str, Any] = {}
    sheets_meta: dict[str, Any] = {}

    def plan_gradcam(folder: Path) -> None:
        for r in [r for r in records if r.command == "unlearn"]:
            src = resolve_sources(r)
            key = f"gradcam-{(r.doc.get('parameters') or {}).get('method')}"
            if src["parent"] is None or src["cleaned"] is None or src["data"] is None:
                doc["missing"].append({"section": key, "reason": f"the parent or cleaned model named in {r.path} no longer exists"})
                continue
            try:
                before_model = load_model(src["parent"], device=dev)
                after_model = load_model(src["cleaned"], device=dev)
                trig = load_trigger(src["trigger"]) if src["trigger"] else None
                clean, _ = load_clean(str(src["data"]), "test", no_cache, tuple(before_model.spec.input_size[1:]))  # type: ignore[arg-type]
            except CleanseError as exc:  # e.g. a raw parent that needs --arch: state it, keep the rest of the report
                doc["missing"].append({"section": key, "reason": exc.message})
                continue
            sheets_meta[key] = before_after_sheet(before_model, after_model, clean, trig, n, folder / f"{key}.png", seed)
            pictures[key] = f"{key}.png"

    with atomic_directory(output, force=force, inputs=guarded) as folder:
        if history_plot(doc["history"], folder / "history.png"):
            pictures["history"] = "history.png"
        for i, scan in enumerate(s for s in doc["scan"] if s.get("classes")):
            suffix = "" if i == 0 else f"-{i}"
            anomaly_plot(scan["classes"], scan["threshold"], folder / f"anomaly{suffix}.png")
            pictures[f"anomaly{suffix}"] = scan["anomaly_image"] = f"anomaly{suffix}.png"
            if scan.get("sheet"):
                write_bytes_atomic(folder / f"scan-sheet{suffix}.png", Path(scan["sheet"]).read_bytes())
                pictures[f"scan-sheet{suffix}"] = scan["sheet_image"] = f"scan-sheet{suffix}.png"
        for i, ex in enumerate(doc["explain"]):
            if ex.get("sheet"):
                write_bytes_atomic(folder / f"explain-{i}.png", Path(ex["sheet"]).read_bytes())
                pictures[f"explain-{i}"] = f"explain-{i}.png"
        plan_gradcam(folder)
        if model is not None:
            doc["direct"] = _direct(model, data, trigger, dev, no_cache, arch, num_classes, input_size, preset, mean, std, classes, arch_arg)  # type: ignore[arg-type]
            doc["missing"] = [m for m in doc["missing"] if m["section"] != "gradcam"]
        doc["images"] = pictures
        doc["gradcam"] = sheets_meta
        write_json_atomic(folder / "report.json", doc)
        if "md" in wanted:
            write_bytes_atomic(folder / "report.md", to_markdown(doc).encode())
        if "html" in wanted:
            write_bytes_atomic(folder / "report.html", to_html(doc, folder).encode())
        record = new_record("report", inputs={"records": [describe_input(r.path) for r in records], "model": describe_input(model)},
                            parameters={"formats": sorted(wanted), "n": n}, result="report.json", versions=versions(dev),
                            timings={"wall_seconds": time.perf_counter() - started})
        write_json_atomic(folder / "run.json", record)
    say(f"report from {len(records)} run record(s): verdict {doc['verdict'] or 'not scanned'}; "
        f"{len(doc['summary'])} unlearning run(s); missing sections: {', '.join(m['section'] for m in doc['missing']) or 'none'}")
    say(f"wrote {output / 'report.html' if 'html' in wanted else output / 'report.json'}")
    if json_out:
        emit_json(doc)


def _direct(model_path: str, data: str, trigger: Path | None, dev: Any, no_cache: bool, *model_args: Any) -> dict[str, Any]:
    from cleanse.cli.unlearn import measure

    model = load_cli_model(model_path, dev, *model_args[:7], model_args[7])
    _, height, width = model.spec.input_size
    clean, dropped = load_clean(data, "test", no_cache, (height, width))
    check_classes(model, clean, data)
    trig = load_trigger(trigger) if trigger else None
    if trig is not None:
        trig.check_size(*model.spec.input_size, what="the model's inputs")
    layer = tar_layer(model, model.spec.input_size)
    return {"model": model_path, "model_sha256": model.source_sha256, "data": data, "trigger": str(trigger) if trigger else None,
            "rows_dropped_as_poisoned": dropped, "tar_layer": layer, "metrics": measure(model, clean, trig, layer)}
