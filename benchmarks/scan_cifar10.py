"""`cleanse scan` on real CIFAR-10 models: every detector's verdict per model, the combined verdict, wall time,
and the trigger-agnostic pipeline (scan -> tar-ewc with the reversed trigger -> the true trigger's ASR).

Models, as comma-separated specs:
- `attack:target:seed`: the default `cnn` trained by benchmarks/train_cifar10.py (cleanse train's defaults;
  the four backdoored ones are kept in benchmarks/models/); `badnets:all:0` is the all-to-all model;
- `plain-attack:target:seed`: benchmarks/plain_train.py's second architecture and plain training loop (plain
  SGD, no label smoothing, no logit scaling), so thresholds are not tuned to one network or one recipe.

    python -m benchmarks.scan_cifar10 [--models badnets:0:0,clean:0:1,plain-sig:3:0] [--budget full]
                                      [--detectors mmbd,patch,additive,warp] [--unlearn] [--threads 2] [--redo]
                                      [--schedule every|screened]
    python -m benchmarks.scan_cifar10 --table

Each scan runs the scan job exactly as `cleanse scan MODEL --data cifar10/test` does (500 clean test images, 80%
optimise / 20% measure) and appends one row to results/scan_cifar10-detectors-rows.jsonl (a model already scanned
with the same settings is skipped unless `--redo`). `--table` prints the stored rows and writes
results/scan_cifar10-detectors-table.md. With `--unlearn`, every flagged model with a true trigger runs `tar-ewc`
(defaults, `--clean-frac 0.05` of the training set) with the reversed trigger of the strongest reverse-engineering
flag, then CA and the true trigger's ASR/RA on the 10,000 test images (issue 27's target: ASR at most 5% with a CA
drop of at most 2 points).

`--speedup-steps N` also times the batched patch reversal against the same optimisation one class after another
(identical results; issue 6's measurement).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, append_row, config_hash, load_rows, machine, require_cifar, write_results
from benchmarks.train_cifar10 import train_cached
from benchmarks.unlearn_cifar10 import run_timed
from cleanse.attacks import load_trigger
from cleanse.data import load_data
from cleanse.data.subset import clean_subset
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import der
from cleanse.engine.layers import tar_layer
from cleanse.engine.measure import measure
from cleanse.jobs import RunSettings, ScanOptions, scan
from cleanse.jobs.scan import HOLD_OUT
from cleanse.models import load_model
from cleanse.recipes import RECIPES
from cleanse.scan import BUDGETS, reverse_triggers
from cleanse.scan.anomaly import small_side
from cleanse.scan.detectors import DETECTORS, DetectorReport
from cleanse.scan.verdict import combine

ROWS = RESULTS / "scan_cifar10-detectors-rows.jsonl"
DEFAULT = (
    "badnets:0:0,blended:1:0,sig:3:0,wanet:5:0,badnets:all:0,clean:0:0,clean:0:1,clean:0:2,"
    "plain-sig:3:0,plain-wanet:5:0,plain-badnets:0:0,plain-clean:0:0"
)


def trained_model(spec: str) -> dict[str, Any]:
    """Train (or reuse) the model a spec names; returns train_cached's dict (model, trigger, metrics, sha256)."""
    attack, target, seed = spec.split(":")
    goal: int | str = target if target == "all" else int(target)
    if attack.startswith("plain-"):
        from benchmarks.plain_train import train_plain

        return train_plain(attack.removeprefix("plain-"), goal, 0.1, int(seed))
    return train_cached(attack, goal, 0.1, int(seed), log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT, help="comma-separated model specs (see above)")
    parser.add_argument("--budget", default="full", choices=list(BUDGETS))
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--detectors", default=None, help="default: every detector (cleanse scan's default)")
    parser.add_argument("--unlearn", action="store_true", help="scan -> tar-ewc with the reversed trigger")
    parser.add_argument("--speedup-steps", type=int, default=0, help="batched vs class-by-class timing (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--schedule", default="every", choices=["every", "screened"], help="scan --schedule")
    parser.add_argument("--redo", action="store_true", help="scan models whose row is already stored again")
    parser.add_argument("--table", action="store_true", help="only print the table of every stored row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table:
        run(args)
    table(load_rows(ROWS))


def run(args: argparse.Namespace) -> None:
    cifar = require_cifar()
    precision = resolve_precision("auto", torch.device("cpu"))
    done = {r["key"] for r in load_rows(ROWS)} if not args.redo else set()
    detectors = None if args.detectors is None else args.detectors.split(",")
    for spec in args.models.split(","):
        trained = trained_model(spec)
        settings = {"model": spec, "budget": args.budget, "n_clean": args.n_clean, "detectors": detectors}
        if args.schedule != "every":  # only when given, so the rows stored before the option keep their keys
            settings["schedule"] = args.schedule
        settings.update(model_sha256=trained["model_sha256"], precision=precision, unlearn=args.unlearn)
        key = config_hash(settings)
        if key in done:
            print(f"{spec}: stored already (--redo to scan again)", flush=True)
            continue
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = scan(
                ScanOptions(
                    trained["model"],
                    data=str(cifar / "test"),
                    n_clean=args.n_clean,
                    budget=args.budget,
                    detectors=detectors,
                    output=Path(tmp) / "scan",
                    schedule=args.schedule,
                ),
                RunSettings(),
            )
            wall = time.perf_counter() - started
            doc = result.doc
            row = _row(spec, key, trained, doc, wall, precision)
            row["load_average"] = [load_before, os.getloadavg()[0]]
            print(_summary(row), flush=True)
            if args.unlearn and doc["suspected_targets"] and trained["trigger"] and row["reversed"]:
                row["pipeline"] = pipeline(trained, row["reversed"], result.output, precision)
        append_row(ROWS, row)
    if args.speedup_steps:
        speedup(args, load_data(str(cifar / "test")), precision)


def _row(spec: str, key: str, trained: dict, doc: dict[str, Any], wall: float, precision: str) -> dict[str, Any]:
    attack, target, seed = spec.split(":")
    truth: int | str | None = None if attack.endswith("clean") else (target if target == "all" else int(target))
    per_detector = {}
    for name, d in doc["detectors"].items():
        scores = [c["score"] for c in d["classes"]]
        rows = d["classes"]
        entry = {
            "flagged": d["flagged"],
            "statistic": [round(c["statistic"], 4) for c in rows],
            "score": [float(f"{s:.4g}") for s in scores],
            "seconds": d["seconds"],
        }
        if d["score"] == "anomaly_index":
            entry["threshold"] = d["threshold"]
            entry["reversed_asr"] = [c["attack_success_rate"] for c in rows]
            entry["reached"] = [c["reached_success"] for c in rows]
            entry["steps_run_share"] = d["steps_run_total"] / (len(rows) * d["steps"])
        else:
            entry["alpha"] = d["alpha"]
        per_detector[name] = entry
    reversed_trigger = None
    strongest = [
        (c["score"], name, c["trigger_file"])
        for name, d in doc["detectors"].items()
        for c in d["classes"]
        if c.get("trigger_file") and c["index"] in doc["suspected_targets"][:1]
    ]
    if strongest:
        reversed_trigger = max(strongest)[2]
    return {
        "key": key,
        "model": spec,
        "attack": attack,
        "target": truth,
        "seed": int(seed),
        "model_sha256": trained["model_sha256"],
        "model_ca": trained["metrics"]["clean_accuracy"],
        "model_asr": trained["metrics"]["attack_success_rate"],
        "backdoored": doc["backdoored"],
        "suspected": doc["suspected_targets"],
        "unconfirmed": doc["unconfirmed"],
        "evidence": doc["evidence"],
        "right_target": (truth in doc["suspected_targets"]) if isinstance(truth, int) else None,
        "false_positive": truth is None and doc["backdoored"],
        "detectors": per_detector,
        "reversed": reversed_trigger,
        "schedule": doc.get("schedule", "every"),
        "wall_seconds": wall,
        "precision": precision,
        "machine": machine(),
    }


def _summary(row: dict[str, Any]) -> str:
    parts = [f"{n}: {d['flagged']}" for n, d in row["detectors"].items()]
    return (
        f"{row['model']:18} verdict {row['suspected']} (truth {row['target']}) | "
        + "; ".join(parts)
        + f" | {row['wall_seconds']:.0f}s"
    )


def pipeline(trained: dict, reversed_file: str, folder: Path, precision: str) -> dict[str, Any]:
    """tar-ewc with the scan's reversed trigger; the true trigger only measures, on the 10,000 test images."""
    cifar = require_cifar()
    train, test = load_data(str(cifar / "train")), load_data(str(cifar / "test"))
    reversed_trigger, true_trigger = load_trigger(folder / reversed_file), load_trigger(trained["trigger"])
    model = load_model(trained["model"])
    layer = tar_layer(model, model.spec.input_size)
    before = measure(model, test, true_trigger, layer)
    split = clean_subset(train, 0.05, None, 0)
    result, wall = run_timed(
        "tar-ewc", RECIPES.get("tar-ewc").resolve_params({}), model, split, reversed_trigger, precision, 0, layer
    )
    after = measure(model, test, true_trigger, layer)
    out = {
        "reversed_trigger": reversed_file,
        "before": before,
        "after": after,
        "der": der(before, after),
        "wall_seconds": wall,
        "ca_drop_points": 100 * (before["clean_accuracy"] - after["clean_accuracy"]),
        "kept": result.kept["tag"],
    }
    print(
        f"  pipeline: tar-ewc with {reversed_file}: true-trigger ASR {before['attack_success_rate']:.4f} -> "
        f"{after['attack_success_rate']:.4f}, CA {before['clean_accuracy']:.4f} -> {after['clean_accuracy']:.4f} "
        f"(drop {out['ca_drop_points']:.2f} points), {wall:.0f}s",
        flush=True,
    )
    return out


def speedup(args: argparse.Namespace, test: Any, precision: str) -> None:
    """The batched patch reversal against the same optimisation one class after another: same images, same steps."""
    spec = args.models.split(",")[0]
    model = load_model(trained_model(spec)["model"])
    split = clean_subset(test, n=args.n_clean, seed=0, hold_back=HOLD_OUT)  # the scan job's split
    budget = replace(BUDGETS[args.budget], steps=args.speedup_steps)
    classes = list(range(model.spec.num_classes))
    t0 = time.perf_counter()
    together = reverse_triggers(model, split.train.images, split.train.labels, classes, budget, precision=precision)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [
        reverse_triggers(model, split.train.images, split.train.labels, [k], budget, precision=precision)
        for k in classes
    ]
    one_by_one = time.perf_counter() - t0
    diff = max(float((a.masks[0] - together.masks[k]).abs().max()) for k, a in enumerate(alone))
    doc = {
        "benchmark": "scan_cifar10-speedup",
        "model": spec,
        "steps": budget.steps,
        "batch": budget.batch,
        "classes": len(classes),
        "batched_seconds": batched,
        "class_by_class_seconds": one_by_one,
        "speedup": one_by_one / batched,
        "max_mask_difference": diff,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "machine": machine(),
        "load_average": os.getloadavg()[0],
    }
    print(
        f"\nbatched {batched:.1f}s vs class by class {one_by_one:.1f}s: {one_by_one / batched:.2f}x (diff {diff:.1e})"
    )
    print("wrote", write_results(f"scan_cifar10-speedup-t{torch.get_num_threads()}", doc))


def _cell(row: dict[str, Any], name: str) -> str:
    """One detector on one model: what it flagged, the truth's score and the most suspicious other class's."""
    d = row["detectors"].get(name)
    if d is None:
        return "-"
    truth = row["target"] if isinstance(row["target"], int) else None
    p_value = "alpha" in d
    scores = d["score"]
    if p_value:
        worst = min(s for k, s in enumerate(scores) if k != truth)
    else:  # only the small side is suspicious
        small = small_side(torch.tensor(d["statistic"]), "log", "loo-z").tolist()
        worst = max((s for k, s in enumerate(scores) if k != truth and small[k]), default=0.0)
    fmt = (lambda s: f"p {s:.2g}") if p_value else (lambda s: f"z {s:.2f}")
    own = f"target {fmt(scores[truth])}, " if truth is not None else ""
    return f"{d['flagged'] or 'none'}: {own}most suspicious other {fmt(worst)}"  # (small side for z)


def recombined(row: dict[str, Any]) -> dict[str, Any]:
    """The combined verdict of a stored row under the current rule (scan/verdict.py), from its per-detector
    statistics, scores and flags: rows stored before a rule change are read the way scan decides today."""
    reports = {}
    for name, d in row["detectors"].items():
        small = [False] * len(d["score"])
        if "threshold" in d:
            small = small_side(torch.tensor(d["statistic"]), "log", "loo-z").tolist()
        classes = [
            {"index": k, "statistic": v, "score": sc, "flagged": k in d["flagged"], "small_side": small[k]}
            for k, (v, sc) in enumerate(zip(d["statistic"], d["score"], strict=True))
        ]
        kind = "anomaly_index" if "threshold" in d else "p_value"
        reports[name] = DetectorReport(name, kind, "", classes, d["flagged"], {})
    return combine(reports, {n for n in reports if DETECTORS.get(n).needs_data})


def table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no stored scan rows")
        return
    names = [n for n in DETECTORS if any(n in r["detectors"] for r in rows)]
    lines = [
        "| model | CA / ASR | verdict (truth) | " + " | ".join(names) + " | wall |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in sorted(rows, key=lambda r: (r["attack"].startswith("plain"), r["attack"].endswith("clean"), r["model"])):
        asr = "-" if r["model_asr"] is None else f"{100 * r['model_asr']:.1f}%"
        truth = "clean" if r["target"] is None else r["target"]
        v = recombined(r)
        verdict = f"{v['suspected_targets'] or 'none'}" + (
            f", unconfirmed {v['unconfirmed']}" if v["unconfirmed"] else ""
        )
        cells = " | ".join(_cell(r, n) for n in names)
        lines.append(
            f"| {r['model']}{' (screened)' if r.get('schedule') == 'screened' else ''} | "
            f"{100 * r['model_ca']:.1f}% / {asr} | {verdict} ({truth}) | {cells} | "
            f"{r['wall_seconds']:.0f}s |"
        )
    piped = [r for r in rows if r.get("pipeline")]
    if piped:
        lines += [
            "",
            "| model | reversed trigger | true-trigger ASR before -> after | CA before -> after (drop) | wall |",
            "|---|---|---|---|---|",
        ]
        for r in piped:
            q = r["pipeline"]
            lines.append(
                f"| {r['model']} | {q['reversed_trigger']} | {100 * q['before']['attack_success_rate']:.2f}% -> "
                f"{100 * q['after']['attack_success_rate']:.2f}% | {100 * q['before']['clean_accuracy']:.2f}% -> "
                f"{100 * q['after']['clean_accuracy']:.2f}% ({q['ca_drop_points']:.2f}) | {q['wall_seconds']:.0f}s |"
            )
    text = "\n".join(lines)
    print(text)
    (RESULTS / "scan_cifar10-detectors-table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
