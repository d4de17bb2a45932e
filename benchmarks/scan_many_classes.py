"""`cleanse scan` against the number of classes (issue 29 (a)): wall time, peak memory and the verdict on synthetic
many-class backdoored models at 64x64.

    python -m benchmarks.scan_many_classes [--classes 10,50,100,200] [--schedules every,screened]
                                           [--detectors patch] [--per-class 100] [--epochs 8] [--patch 3] [--threads 2]
    python -m benchmarks.scan_many_classes --table
    python -m benchmarks.scan_many_classes --replay benchmarks/results/scan_many_classes-run-K100-screened-t1.json

For each K: `cleanse.data.synthetic.make_many_classes(K)` at 64x64 (shape x hue classes; per-class images for
training, 20 per class for the clean data the scan draws from), BadNets (a `--patch`-pixel white square, default 3)
at 10% with target 0, a `cnn` of widths 32,64,128 trained by cleanse's engine (`--epochs`, cleanse train's defaults
otherwise; cached under benchmarks/cache/ by configuration), then `cleanse scan MODEL --data CLEAN --detectors D
--schedule S` in its own process per schedule, sampled every 20 ms for peak RSS (benchmarks/data_scale.py's
`measured`). Target: a 100-class model scanned, right target, in at most 10 minutes and 4 GiB RSS on 2 cores. Writes
results/scan_many_classes.json and scan_many_classes-table.md (each K's row is stored as soon as it is measured;
another --patch writes scan_many_classes-patch<N>*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CACHE, RESULTS, config_hash, machine, write_results
from benchmarks.data_scale import measured
from cleanse.attacks import poison_dataset
from cleanse.data.dataset import Dataset, save_dataset
from cleanse.data.synthetic import make_many_classes
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import evaluate
from cleanse.engine.train import TrainConfig, train_model
from cleanse.models import new_model, save_model
from cleanse.scan.reverse import BUDGETS
from cleanse.training_defaults import data_normalization

SIZE = 64
# The planted patch's side. 3 pixels (BadNets' 3x3 square, unscaled): with badnets' default at 64 px, 6x6, the
# `cnn`'s clean classes flip with masks of 20-40 pixels and the true trigger itself reverses to 26, so no statistic
# can single the backdoor out (docs/commands/scan.md, "Many classes"); `--patch 6` reproduces that testbed.
PATCH = 3
WIDTH = "32,64,128"
CLEAN_PER_CLASS = 20


def stem(patch: int) -> str:
    """Results file names: the default patch's plain, another's marked (scan_many_classes-patch6...)."""
    return "scan_many_classes" if patch == PATCH else f"scan_many_classes-patch{patch}"


def trained(classes: int, per_class: int, epochs: int, patch: int = PATCH, clean: bool = False) -> dict[str, Any]:
    """The backdoored K-class model (cached), its metrics and training seconds; `patch`: the BadNets side in
    pixels; `clean`: trained on the unpoisoned set instead (its ASR is the planted trigger's on a clean model)."""
    key = {"classes": classes, "per_class": per_class, "epochs": epochs, "size": SIZE, "width": WIDTH, "seed": 0}
    key |= {"patch": patch} if patch != 6 else {}  # 6 (badnets' default at 64 px) keeps the first models' names
    key |= {"clean": True} if clean else {}
    kind = "clean" if clean else "badnets-t0"
    path = CACHE / f"many-{classes}-{kind}-{config_hash(key)}.safetensors"
    info = path.with_suffix(".json")
    if path.is_file() and info.is_file():
        return {"model": str(path), **json.loads(info.read_text())}
    train = make_many_classes(classes, per_class * classes, SIZE, seed=0)
    test = make_many_classes(classes, max(2000, 10 * classes), SIZE, seed=1)
    poisoned, trigger = poison_dataset(train, "badnets", 0, 0.1, seed=0, params={"size": str(patch)})
    poisoned = train if clean else poisoned
    mean, std = data_normalization(poisoned)
    model = new_model("cnn", classes, train.classes, (3, SIZE, SIZE), mean, std, {"width": WIDTH}, seed=0)
    CACHE.mkdir(parents=True, exist_ok=True)  # a fresh checkout has none
    started = time.perf_counter()
    precision = resolve_precision("auto", torch.device("cpu"))
    train_model(model, poisoned, TrainConfig(epochs=epochs, precision=precision))
    seconds = time.perf_counter() - started
    metrics = evaluate(model, test, trigger)
    save_model(model, path)
    doc = {
        "train_seconds": seconds,
        "clean_accuracy": metrics["clean_accuracy"],
        "attack_success_rate": metrics["attack_success_rate"],
    }
    info.write_text(json.dumps(doc))
    return {"model": str(path), **doc}


def clean_set(classes: int) -> Dataset:
    """The clean images a K-class model is scanned with (held apart from its training and test sets by the seed)."""
    return make_many_classes(classes, CLEAN_PER_CLASS * classes, SIZE, seed=2)


def scan_row(
    classes: int,
    model: str,
    schedule: str,
    detectors: str,
    threads: int,
    memory_budget: str | None,
    patch: int,
    clean: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        data = Path(tmp) / "clean.safetensors"
        save_dataset(clean_set(classes), data)
        argv = [sys.executable, "-m", "cleanse", "scan", model, "--data", str(data), "--detectors", detectors]
        argv += ["--schedule", schedule, "-o", str(Path(tmp) / "scan"), "--json", "--quiet"]
        argv += ["--memory-budget", memory_budget] if memory_budget else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        run = measured(argv, env)
        text = (Path(tmp) / "scan" / "scan.json").read_text()
        # the whole scan.json, kept: a many-class scan takes an hour and its evidence must outlive the temp folder;
        # run.json too, for its per-round history (what a shorter screen would have kept can be read off it)
        name = f"{stem(patch)}-{{}}-K{classes}{'-clean' if clean else ''}-{schedule}-t{threads}.json"
        (RESULTS / name.format("scan")).write_text(text)
        shutil.copyfile(Path(tmp) / "scan" / "run.json", RESULTS / name.format("run"))
        doc = json.loads(text)
    return {
        "schedule": schedule,
        "detectors": detectors,
        "suspected_targets": doc["suspected_targets"],
        "right_target": doc["suspected_targets"] == ([] if clean else [0]),  # a clean model: nothing flagged
        "class_steps": {name: d.get("steps_run_total") for name, d in doc["detectors"].items()},
        # classes per forward: the memory plan's chunk (on a CPU at most 256 MiB a forward since 2026-12-07)
        "chunk_classes": {name: d.get("chunk_classes") for name, d in doc["detectors"].items()},
        "threads": threads,
        "cpu": machine()["cpu"],  # rows merge across sessions, whose machines differ
        "memory_budget": memory_budget,
        **run,
    }


def replay_screens(run: dict[str, Any], target: int, lengths: list[int]) -> str:
    """What a screen of each length would have kept, read off a stored run.json's patch-reversal history (a class's
    trajectory up to the cut does not depend on where the cut falls): the target's rank under the screen's rule
    (smallest working trigger first, then highest attack success, ties by index), and the screen's class-steps."""
    rows = {r["step"]: r for r in run["history"] if r.get("phase") == "reverse" and r.get("family") == "patch"}
    k = len(next(iter(rows.values()))["best_size"])
    keep = BUDGETS["full"].kept_classes(k)
    lines = [
        f"K = {k}, the screen keeps {keep}; target {target}",
        "",
        "| screen steps | classes with a working trigger | target's rank | target kept | screen class-steps |",
        "|---|---|---|---|---|",
    ]
    for length in lengths:
        if length not in rows:
            continue
        best = [math.inf if b is None else b for b in rows[length]["best_size"]]
        success = rows[length]["attack_success"]
        order = sorted(range(k), key=lambda c: (0, best[c], c) if math.isfinite(best[c]) else (1, -success[c], c))
        rank = order.index(target)
        reached = sum(math.isfinite(b) for b in best)
        lines.append(f"| {length} | {reached} | {rank + 1} | {'yes' if rank < keep else 'no'} | {k * length} |")
    return "\n".join(lines) + "\n"


def _merged(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
    """`rows` with the row of K (backdoored or clean) updated: its scans replaced by schedule and thread count, the
    others kept."""

    def same(r: dict[str, Any]) -> bool:
        return r["classes"] == row["classes"] and r.get("clean", False) == row.get("clean", False)

    old = next((r for r in rows if same(r)), None)
    if old is not None:
        new = {(s["schedule"], s.get("threads")) for s in row["scans"]}
        row["scans"] = [s for s in old["scans"] if (s["schedule"], s.get("threads")) not in new] + row["scans"]
    return sorted([r for r in rows if not same(r)] + [row], key=lambda r: (r["classes"], r.get("clean", False)))


def _chunks(scan: dict[str, Any]) -> str:
    chunks = scan.get("chunk_classes") or {}
    return ", ".join(f"{k} {v}" for k, v in chunks.items() if v is not None) or "-"


def _cpu(scan: dict[str, Any]) -> str:
    return f"{scan['cpu_seconds']:.0f}" if "cpu_seconds" in scan else "-"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"  # a row measured by /usr/bin/time has no anonymous share


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"synthetic {SIZE}x{SIZE} many-class sets, `cnn` {WIDTH}, BadNets {doc['settings'].get('patch', 6)}x"
        f"{doc['settings'].get('patch', 6)} patch at 10%, target 0; torch {doc['machine']['torch']}; wall times only "
        "from a run with nothing beside it count against the target, and compare only within one machine (CPU s: the "
        "process's user + system time)",
        "",
        "| K | model | CA | ASR | schedule | detectors | machine | threads | suspected | verdict | class-steps "
        "| image-steps | classes per forward | wall s | CPU s | peak RSS MiB | peak anon MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        for s in row["scans"]:
            steps = ", ".join(f"{k} {v}" for k, v in s["class_steps"].items() if v is not None)
            # one clean image through a forward and backward; every step takes the full budget's whole batch, except
            # in the shared-batch screen experiment, whose rows recorded their own count
            counted = s.get("image_steps") or {k: v * BUDGETS["full"].batch for k, v in s["class_steps"].items() if v}
            images = ", ".join(f"{k} {v}" for k, v in counted.items() if v is not None)
            lines.append(
                f"| {row['classes']} | {'clean' if row.get('clean') else 'backdoored'} | "
                f"{s.get('model_ca', row['clean_accuracy']):.3f} | "
                f"{s.get('model_asr', row['attack_success_rate']):.3f} | "
                f"{s['schedule']} | {s['detectors']} | {s.get('cpu', doc['machine']['cpu'])} | "
                f"{s.get('threads', '-')} | "
                f"{s['suspected_targets']} | "
                f"{'right' if s['right_target'] else 'wrong'} | {steps} | {images} | {_chunks(s)} | "
                f"{s['seconds']:.0f} | {_cpu(s)} | "
                f"{s['peak_rss_mib']:.0f} | {_mib(s.get('peak_anon_mib'))} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="10,50,100,200")
    parser.add_argument("--schedules", default="every,screened")
    parser.add_argument("--detectors", default="patch")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patch", type=int, default=PATCH, help="the planted BadNets patch's side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget", default=None, help="scan --memory-budget (default: the scan's own)")
    parser.add_argument(
        "--clean", action="store_true", help="scan clean K-class models instead (the right verdict: nothing flagged)"
    )
    parser.add_argument("--table", action="store_true", help="only print the stored table")
    parser.add_argument("--replay", metavar="RUN_JSON", help="only replay shorter screens on a stored run.json")
    args = parser.parse_args()
    if args.replay:
        print(replay_screens(json.loads(Path(args.replay).read_text()), 0, [25, 50, 75, 100, 125, 150]))
        return
    path = RESULTS / f"{stem(args.patch)}.json"
    table_path = RESULTS / f"{stem(args.patch)}-table.md"
    if args.table:
        print(table(json.loads(path.read_text())))
        return
    torch.set_num_threads(args.threads)
    settings = {"per_class": args.per_class, "epochs": args.epochs, "patch": args.patch}  # threads: per scan
    doc = {"benchmark": "scan_many_classes", "settings": settings, "machine": machine(), "rows": []}
    if path.is_file():  # rows merge by K, so one K can be (re)measured alone
        stored = json.loads(path.read_text())
        if {k: stored.get("settings", {}).get(k, 6 if k == "patch" else None) for k in settings} == settings:
            doc["rows"] = stored["rows"]
    for classes in (int(k) for k in args.classes.split(",")):
        model = trained(classes, args.per_class, args.epochs, args.patch, args.clean)
        row = {"classes": classes, "clean": args.clean, **{k: v for k, v in model.items() if k != "model"}}
        row["scans"] = []
        for schedule in args.schedules.split(","):
            scan = scan_row(
                classes,
                model["model"],
                schedule,
                args.detectors,
                args.threads,
                args.memory_budget,
                args.patch,
                args.clean,
            )
            # the model's own figures beside its scan: a K retrained on another machine replaces the row's, not the
            # older scans' (rows merge by K)
            scan |= {"model_ca": model["clean_accuracy"], "model_asr": model["attack_success_rate"]}
            row["scans"].append(scan)
            s = row["scans"][-1]
            print(
                f"K={classes:>4} {'clean ' if args.clean else ''}CA {row['clean_accuracy']:.3f} "
                f"ASR {row['attack_success_rate']:.3f} "
                f"{schedule:9} suspected {s['suspected_targets']} {s['seconds']:.0f}s "
                f"rss {s['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        doc["rows"] = _merged(doc["rows"], row)
        write_results(stem(args.patch), doc)
        table_path.write_text(table(doc))
    print(table(doc))


if __name__ == "__main__":
    main()
