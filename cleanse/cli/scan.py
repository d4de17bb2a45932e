"""`cleanse scan`: is this model backdoored, which class, and what is the trigger? Exit 0 clean, 1 suspected, 2 bad input."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from cleanse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, NoCacheOpt, PrecisionOpt, QuietOpt, SeedOpt, emit_json,
                                fmt_rate, say, start)
from cleanse.cli.model_opts import (ArchArgOpt, ArchOpt, ClassesOpt, InputSizeOpt, MeanOpt, NumClassesOpt, PresetOpt, StdOpt,
                                    load_cli_model)
from cleanse.cli.render import Monitor, float_cell, seconds_cell, show
from cleanse.cli.train import check_classes, load_clean
from cleanse.data import load_data
from cleanse.engine.device import resolve_device, resolve_precision
from cleanse.engine.events import Event
from cleanse.engine.gradcam import resolve_layer, tar_layer
from cleanse.errors import CleanseError
from cleanse.files import atomic_directory, check_output_folder, write_json_atomic
from cleanse.record import describe_input, new_record, versions
from cleanse.scan import BUDGETS, audit_data, scan_model
from cleanse.scan.anomaly import DEFAULT_THRESHOLDS, SCALES, STATISTICS
from cleanse.scan.neural_cleanse import mask_pictures
from cleanse.viz import image_grid, save_png

EXIT_SUSPECTED = 1
SCAN_COLUMNS = [("step", "step", float_cell), ("reached", "classes reversed", str), ("active", "still optimising", str), ("smallest", "smallest mask (class: L1)", str),
                ("median_l1", "median L1", float_cell), ("elapsed", "elapsed", seconds_cell)]
BUDGET_HELP = "fast | full: " + ", ".join(f"{k} = {b.steps} steps x {b.batch} images per class" for k, b in BUDGETS.items())


def scan_command(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="Model to scan (.safetensors, or a raw state dict with --arch ...).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Clean DATA to reverse triggers from (rows marked poisoned are dropped).")] = None,
    n_clean: Annotated[int, typer.Option("--n-clean", help="Clean images to use (80% optimise, 20% measure the reversed triggers).")] = 500,
    budget: Annotated[str, typer.Option("--budget", help=BUDGET_HELP)] = "full",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Override the budget's optimisation steps.")] = None,
    early_stop: Annotated[bool, typer.Option("--early-stop/--no-early-stop", help="Let each class stop once its mask has stopped shrinking "
                                             "(Neural Cleanse's rule, docs/commands/scan.md); --no-early-stop runs every class for every step.")] = True,
    statistic: Annotated[str, typer.Option("--statistic", help="loo-z | mad: each class's mask size against the other classes' "
                                           "mean and std (leave-one-out z, default), or Neural Cleanse's MAD anomaly index.")] = "loo-z",
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Flag a class whose anomaly index exceeds this on the small "
                                                       "side (default 3.5 for loo-z, 3 for mad; Neural Cleanse: mad, linear, 2).")] = None,
    scale: Annotated[str, typer.Option("--scale", help="log | linear: the statistic on log mask norms (default) or raw ones (Neural Cleanse's).")] = "log",
    layer: Annotated[Optional[str], typer.Option("--layer", help="Layer for the reversed triggers' TAR (default: the TAR layer).")] = None,
    audit_data_spec: Annotated[Optional[str], typer.Option("--audit-data", help="Also rank this training DATA's samples by suspicion.")] = None,
    poison_rate: Annotated[Optional[float], typer.Option("--poison-rate", help="Expected poison rate for precision/recall (default: the file's own).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for scan.json, PNGs, trigger files (default <model stem>.scan).")] = None,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    preset: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    precision: PrecisionOpt = "auto",
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Reverse-engineer a trigger per class (Neural Cleanse, all classes batched) and flag anomalously small ones.

    Exit codes: 0 no backdoor found, 1 backdoor suspected, 2 bad input or usage. With --audit-data only, exit 0 when it finishes.
    """
    start(debug=debug, quiet=quiet, json_out=json_out)
    started = time.perf_counter()
    if data is None and audit_data_spec is None:
        raise CleanseError("scan needs --data CLEAN_DATA (trigger reverse-engineering) and/or --audit-data TRAINING_DATA (sample ranking)")
    if budget not in BUDGETS:
        raise CleanseError(f"--budget {budget!r} is unknown; choose one of: {', '.join(BUDGETS)}")
    plan = BUDGETS[budget] if steps is None else replace(BUDGETS[budget], steps=steps)
    plan = plan if early_stop else replace(plan, early_stop=0)
    if plan.steps < plan.round_steps:
        raise CleanseError(f"--steps {steps} is too few; give at least {plan.round_steps}")
    if n_clean < 1:
        raise CleanseError("--n-clean must be a positive number of images")
    if scale not in SCALES:
        raise CleanseError(f"--scale {scale!r} is unknown; choose one of: {', '.join(SCALES)}")
    if statistic not in STATISTICS:
        raise CleanseError(f"--statistic {statistic!r} is unknown; choose one of: {', '.join(STATISTICS)}")
    threshold = DEFAULT_THRESHOLDS[statistic] if threshold is None else threshold
    if not threshold > 0 or threshold == float("inf"):
        raise CleanseError(f"--threshold {threshold} must be positive (default 3.5 for loo-z, 3 for mad; Neural Cleanse uses mad, linear, 2)")
    if poison_rate is not None and not 0 < poison_rate < 1:
        raise CleanseError(f"--poison-rate {poison_rate} must lie in (0, 1)")
    output = output or Path(model_path).with_name(Path(model_path).stem + ".scan")
    inputs = (model_path, data, audit_data_spec)
    check_output_folder(output, force=force, inputs=inputs)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model = load_cli_model(model_path, dev, arch, num_classes, input_size, preset, mean, std, classes, arch_arg)
    _, height, width = model.spec.input_size
    measure_layer = layer or tar_layer(model, model.spec.input_size)
    resolve_layer(model, measure_layer)

    doc: dict[str, Any] = {"model": model_path, "model_sha256": model.source_sha256}
    result = None
    if data is not None:
        if model.spec.num_classes < 3:
            raise CleanseError(f"the model has {model.spec.num_classes} classes; the anomaly test needs at least 3")
        clean, dropped = load_clean(data, "test", no_cache, (height, width))
        check_classes(model, clean, data)
        say(f"reversing a trigger for each of {model.spec.num_classes} classes at once ({budget}: "
            f"{plan.steps} steps) from {min(n_clean, len(clean))} clean images of {data}")
        with Monitor(f"scan {budget}", SCAN_COLUMNS) as monitor:
            result = scan_model(model, clean, n_clean, budget, plan, threshold, seed, prec, measure_layer,
                                callback=lambda e: monitor(_scan_row(e)) if e.kind == "row" else monitor(e), scale=scale,
                                statistic=statistic)
        doc.update(result.doc)
        doc["rows_dropped_as_poisoned"] = dropped
        for k in result.doc["suspected_targets"]:
            doc["classes"][k]["trigger_file"] = f"trigger-{k}.safetensors"
    audit = None
    if audit_data_spec is not None:
        suspect = load_data(audit_data_spec, split="train", cache=not no_cache, image_size=(height, width))
        check_classes(model, suspect, audit_data_spec)
        rate = poison_rate if poison_rate is not None else (suspect.meta.get("attack") or {}).get("rate")
        say(f"auditing {len(suspect)} samples of {audit_data_spec} (spectral signature + activation clustering)")
        audit = audit_data(model, suspect, rate, prec)
        doc["audit"] = {k: v for k, v in audit.items() if k != "ranking"} | {"file": "audit.json", "top": audit["ranking"][:20]}
    wall = time.perf_counter() - started
    doc["wall_seconds"] = wall
    record = new_record("scan", inputs={"model": describe_input(model_path), "data": describe_input(data),
                                        "audit_data": describe_input(audit_data_spec)},
                        parameters={"n_clean": n_clean, "budget": budget, "steps": plan.steps, "early_stop_rounds": plan.early_stop, "statistic": statistic, "threshold": threshold, "scale": scale, "seed": seed, "tar_layer": measure_layer,
                                    "precision": prec, "poison_rate": poison_rate},
                        result="scan.json", verdict={"backdoored": doc.get("backdoored"), "suspected_targets": doc.get("suspected_targets")},
                        history=result.reversed.history if result else [], versions=versions(dev), timings={"wall_seconds": wall})
    with atomic_directory(output, force=force, inputs=inputs) as folder:
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
    _show(doc)
    say(f"wrote scan.json{', class-*.png, sheet.png' if result else ''}{', audit.json' if audit else ''} to {output}/ ({wall:.0f}s)")
    if json_out:
        emit_json(doc)
    if doc.get("backdoored"):
        raise typer.Exit(EXIT_SUSPECTED)


def _scan_row(event: Event) -> Event:
    """The engine's per-round vectors, summarised for one table row."""
    d = event.data
    best = [v for v in d["best_l1"]]
    finite = [(v, k) for k, v in enumerate(best) if v != float("inf")]
    smallest = f"{min(finite)[1]}: {min(finite)[0]:.1f}" if finite else "-"
    ordered = sorted(d["mask_l1"])
    median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    return Event("row", {"step": f"{d['step']}/{d['steps']}", "reached": f"{len(finite)}/{len(best)}",
                         "active": f"{sum(d['active'])}/{len(best)}", "smallest": smallest,
                         "median_l1": median, "elapsed": d["elapsed"]})


def _show(doc: dict[str, Any]) -> None:
    if "classes" in doc:
        what = "leave-one-out z" if doc["statistic"] == "loo-z" else "MAD anomaly index"
        table = Table(title=f"reversed triggers ({what} of the {doc['scale']} mask L1 norms)", title_justify="left")
        for header in ("class", "mask L1", "anomaly index", "ASR (held out)", "TAR", "flagged"):
            table.add_column(header, justify="left" if header == "class" else "right")
        for c in doc["classes"]:
            table.add_row(f"{c['index']} {c['name']}", f"{c['mask_l1']:.1f}", f"{c['anomaly_index']:.2f}", fmt_rate(c["attack_success_rate"]),
                          "-" if c["tar"] is None else f"{c['tar']:.2f}", "yes" if c["flagged"] else "")
        show(table)
        if doc["backdoored"]:
            names = ", ".join(f"{k} ({doc['classes'][k]['name']})" for k in doc["suspected_targets"])
            say(f"verdict: BACKDOOR SUSPECTED, target {names}; reversed trigger(s) written as trigger-<class>.safetensors")
        else:
            say(f"verdict: no backdoor found (no anomaly index above {doc['threshold']} on the small side)")
    if "audit" in doc:
        a = doc["audit"]
        pr = a.get("precision_recall")
        if pr:
            say(f"data audit at the expected poison count k={a['k']}: " + "; ".join(
                f"{name} precision {fmt_rate(v['precision'])} recall {fmt_rate(v['recall'])}" for name, v in pr.items()))
        else:
            say(f"data audit: {a['n']} samples ranked in audit.json" + ("" if a["ground_truth"] else " (no ground truth in the file)"))
