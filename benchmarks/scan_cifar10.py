"""`cleanse scan` on real CIFAR-10 `cnn` models: detection, target, wall time, and the batched speed-up.

For each cached model from benchmarks/train_cifar10.py (backdoored and clean),
one full scan as `cleanse scan MODEL --data cifar10/test` runs it (500 clean
test images, 80% optimise / 20% measure). Then, on one model, the batched
optimisation against the same optimisation run one class after another with
the same images and steps (identical results; only the time differs).

    python -m benchmarks.scan_cifar10 [--models badnets:0:0,clean:0:0] [--budget full] [--speedup-steps 50]
                                      [--unlearn] [--threads 1]
    python -m benchmarks.scan_cifar10 --table

Rows are appended to results/scan_cifar10-rows.jsonl as each scan finishes (a model already scanned
with the same settings is skipped unless `--redo`); `--table` prints every stored row.

With `--unlearn`, the trigger-agnostic pipeline on every flagged model: `tar-ewc` (defaults,
`--clean-frac 0.05` of the training set) with the reversed trigger of the most anomalous
flagged class, then CA and the TRUE trigger's ASR/RA on the 10,000 test images (target:
ASR at most 5% with CA drop at most 2 points).

`--models` lists attack:target:seed triples of models already in benchmarks/cache/ (trained if missing).
Targets (issue 6): BadNets and Blended detected with the right target, no clean model flagged, a full scan
in at most 5 minutes on 2 cores, batched at least 5x faster than class by class at the same steps.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.common import (
    CLEAN_MODELS,
    DEFAULT_MODELS,
    RESULTS,
    append_row,
    config_hash,
    load_rows,
    machine,
    parse_models,
    require_cifar,
    write_results,
)
from benchmarks.train_cifar10 import train_cached
from benchmarks.unlearn_cifar10 import run_timed
from cleanse.attacks import load_trigger
from cleanse.data import load_data
from cleanse.data.subset import clean_subset
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import der
from cleanse.engine.gradcam import tar_layer
from cleanse.engine.measure import measure
from cleanse.models import load_model
from cleanse.recipes import RECIPES
from cleanse.scan import BUDGETS, reverse_triggers, scan_model
from cleanse.scan.anomaly import DEFAULT_THRESHOLDS, STATISTICS, anomaly_index, flag_small
from cleanse.scan.neural_cleanse import HOLD_OUT

ROWS = RESULTS / "scan_cifar10-rows.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS + CLEAN_MODELS), help="attack:target:seed, comma-separated"
    )
    parser.add_argument("--budget", default="full", choices=list(BUDGETS))
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--statistic", default="loo-z", choices=list(STATISTICS))
    parser.add_argument(
        "--threshold", type=float, default=None, help="default: the statistic's (cleanse scan's) default"
    )
    parser.add_argument("--scale", default="log", choices=["log", "linear"])
    parser.add_argument(
        "--no-early-stop", action="store_true", help="every class runs every step (cleanse scan --no-early-stop)"
    )
    parser.add_argument(
        "--speedup-steps", type=int, default=0, help="steps for the batched vs class-by-class timing (0: skip)"
    )
    parser.add_argument(
        "--unlearn", action="store_true", help="scan -> tar-ewc with the reversed trigger -> ASR of the true trigger"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--redo", action="store_true", help="scan models whose row is already stored again")
    parser.add_argument("--table", action="store_true", help="only print the table of every stored row")
    args = parser.parse_args()
    args.threshold = DEFAULT_THRESHOLDS[args.statistic] if args.threshold is None else args.threshold
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table:
        run(args)
    table(load_rows(ROWS))


def run(args: argparse.Namespace) -> None:
    cifar = require_cifar()
    test = load_data(str(cifar / "test"))
    precision = resolve_precision("auto", torch.device("cpu"))
    done = {r["key"] for r in load_rows(ROWS)} if not args.redo else set()
    train = load_data(str(cifar / "train")) if args.unlearn else None
    plan = replace(BUDGETS[args.budget], early_stop=0) if args.no_early_stop else BUDGETS[args.budget]
    for attack, target, seed in parse_models(args.models):
        settings = {
            "model": [attack, target, seed],
            "budget": args.budget,
            "n_clean": args.n_clean,
            "threshold": args.threshold,
            "scale": args.scale,
            "statistic": args.statistic,
            "unlearn": args.unlearn,
        }
        if plan.early_stop:  # rows from before early stopping existed ran without it and keep their key
            settings["early_stop"] = plan.early_stop
        trained = train_cached(attack, target, 0.1, seed, log=False)
        settings["model_sha256"] = trained["model_sha256"]
        if precision != "bf16":  # the precision joined the key later; bf16 rows keep their old key (results/README.md)
            settings["precision"] = precision
        key = config_hash(settings)
        if key in done:
            print(f"{attack} t{target} s{seed}: stored already (--redo to scan again)", flush=True)
            continue
        model = load_model(trained["model"])
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        result = scan_model(
            model,
            test,
            args.n_clean,
            args.budget,
            plan,
            args.threshold,
            0,
            precision,
            tar_layer(model, model.spec.input_size),
            scale=args.scale,
            statistic=args.statistic,
        )
        wall = time.perf_counter() - started
        doc = result.doc
        truth = None if attack == "clean" else target
        row = {
            "key": key,
            "attack": attack,
            "target": truth,
            "seed": seed,
            "model_sha256": trained["model_sha256"],
            "budget": args.budget,
            "threshold": args.threshold,
            "scale": args.scale,
            "statistic": args.statistic,
            "early_stop_rounds": plan.early_stop,
            "steps_run": [c["steps_run"] for c in doc["classes"]],
            "steps_budget": plan.steps,
            "backdoored": doc["backdoored"],
            "suspected": doc["suspected_targets"],
            "right_target": truth in doc["suspected_targets"] if truth is not None else None,
            "false_positive": attack == "clean" and doc["backdoored"],
            "wall_seconds": wall,
            "optimise_seconds": doc["optimise_seconds"],
            "median_mask_l1": doc["median_mask_l1"],
            "mask_l1": [round(c["mask_l1"], 2) for c in doc["classes"]],
            "anomaly_index": [round(c["anomaly_index"], 3) for c in doc["classes"]],
            "anomaly_index_mad": [round(c["anomaly_index_mad"], 3) for c in doc["classes"]],
            "anomaly_index_linear": [round(c["anomaly_index_linear"], 3) for c in doc["classes"]],
            "flagged_linear_2": [
                c["index"]
                for c in doc["classes"]
                if c["anomaly_index_linear"] > 2 and c["mask_l1"] < doc["median_mask_l1"]
            ],
            "reversed_asr": [c["attack_success_rate"] for c in doc["classes"]],
            "model_ca": trained["metrics"]["clean_accuracy"],
            "model_asr": trained["metrics"]["attack_success_rate"],
            "precision": precision,
            "machine": machine(),
            "load_average": [load_before, os.getloadavg()[0]],
        }
        print(
            f"{attack:8} t{target} s{seed}: flagged {doc['suspected_targets']} (truth {truth}) "
            f"anomaly {row['anomaly_index']} L1 {row['mask_l1']} {wall:.0f}s",
            flush=True,
        )
        if args.unlearn and doc["suspected_targets"] and trained["trigger"]:
            row["pipeline"] = pipeline(trained, result, train, test, seed, precision, args, plan)
        append_row(ROWS, row)
    if args.speedup_steps:
        speedup(args, test, precision)


def speedup(args: argparse.Namespace, test: Any, precision: str) -> None:
    """The batched optimisation against the same optimisation one class after another: same images, same steps."""
    attack, target, seed = parse_models(args.models)[0]
    model = load_model(train_cached(attack, target, 0.1, seed, log=False)["model"])
    split = clean_subset(test, n=args.n_clean, seed=0, hold_back=HOLD_OUT)  # scan_model's split
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
        "model": [attack, target, seed],
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
        f"\nbatched {batched:.1f}s vs class by class {one_by_one:.1f}s "
        f"at {budget.steps} steps x {budget.batch} images: "
        f"{one_by_one / batched:.2f}x (max mask difference {diff:.2e})"
    )
    print("wrote", write_results(f"scan_cifar10-speedup-t{torch.get_num_threads()}", doc))


def table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no stored scan rows")
        return
    lines = [
        "| model | CA / ASR | budget | class-steps run | flagged (truth) "
        "| target's index: loo-z / MAD log / MAD linear | highest other (loo-z / MAD log) "
        "| target L1 vs median | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["budget"], r.get("early_stop_rounds", 0), r["attack"] == "clean", r["attack"], r["seed"])
    ):
        t = r["target"]
        own = (
            f"{r['anomaly_index'][t]:.2f} / {r['anomaly_index_mad'][t]:.2f} / {r['anomaly_index_linear'][t]:.2f}"
            if t is not None
            else "-"
        )
        small = [i for i in range(len(r["mask_l1"])) if i != t and r["mask_l1"][i] < r["median_mask_l1"]]
        other = (
            f"{max((r['anomaly_index'][i] for i in small), default=0.0):.2f} / "
            f"{max((r['anomaly_index_mad'][i] for i in small), default=0.0):.2f}"
        )
        l1 = (
            f"{r['mask_l1'][t]:.1f} vs {r['median_mask_l1']:.1f}"
            if t is not None
            else f"- vs {r['median_mask_l1']:.1f}"
        )
        asr = "-" if r["model_asr"] is None else f"{100 * r['model_asr']:.1f}%"
        budget = r["budget"] + (f", early stop {r['early_stop_rounds']}" if r.get("early_stop_rounds") else "")
        share = f"{sum(r['steps_run']) / (len(r['steps_run']) * r['steps_budget']):.0%}" if "steps_run" in r else "100%"
        lines.append(
            f"| {r['attack']} t{t if t is not None else '-'} s{r['seed']} {r['precision']} | "
            f"{100 * r['model_ca']:.1f}% / {asr} | {budget} | {share} | "
            f"{r['suspected']} ({t if t is not None else 'clean'}) | {own} | {other} | {l1} | "
            f"{r['wall_seconds']:.0f}s |"
        )
    piped = [r for r in rows if r.get("pipeline")]
    if piped:
        lines += [
            "",
            "| model | reversed class | true-trigger ASR before -> after | CA before -> after (drop) | RA after | wall "
            "| target L1 reversed again (index, flagged) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in piped:
            q = r["pipeline"]
            lines.append(
                f"| {r['attack']} t{r['target']} s{r['seed']} {r['precision']} | {q['reversed_target']} | "
                f"{100 * q['before']['attack_success_rate']:.2f}% -> {100 * q['after']['attack_success_rate']:.2f}% | "
                f"{100 * q['before']['clean_accuracy']:.2f}% -> {100 * q['after']['clean_accuracy']:.2f}% "
                f"({q['ca_drop_points']:.2f}) | {100 * q['after']['robust_accuracy']:.2f}% | "
                f"{q['wall_seconds']:.0f}s | "
                + (
                    f"{q['target_l1_before']:.1f} -> {q['target_l1_after']:.1f} ({q['target_index_after']:.2f}, "
                    f"{'yes' if q['flagged_after'] else 'no'}) |"
                    if "target_l1_after" in q
                    else "- |"
                )
            )
    text = "\n".join(lines)
    print(text)
    (RESULTS / "scan_cifar10-table.md").write_text(text + "\n")


def pipeline(
    trained: dict, scan: Any, train: Any, test: Any, seed: int, precision: str, args: argparse.Namespace, plan: Any
) -> dict:
    """tar-ewc with the reversed trigger of the most anomalous flagged class; the true trigger only measures. Then the
    target class reversed again on the cleaned model (same images, budget and seed as the scan) and its mask L1 tested
    against the other classes' L1 from the scan: would the scan still flag it?"""
    flagged = scan.doc["suspected_targets"]
    target = max(flagged, key=lambda k: scan.doc["classes"][k]["anomaly_index"])
    reversed_trigger, true_trigger = scan.triggers[target], load_trigger(trained["trigger"])
    model = load_model(trained["model"])
    layer = tar_layer(model, model.spec.input_size)
    before = measure(model, test, true_trigger, layer)
    split = clean_subset(train, 0.05, None, seed)
    result, wall = run_timed(
        "tar-ewc", RECIPES.get("tar-ewc").resolve_params({}), model, split, reversed_trigger, precision, seed, layer
    )
    after = measure(model, test, true_trigger, layer)
    images = scan.optimised
    again = reverse_triggers(model, images.images, images.labels, [target], plan, seed=0, precision=precision)
    norms = scan.reversed.mask_l1.clone()
    norms[target] = again.mask_l1[0]
    out = {
        "reversed_target": target,
        "before": before,
        "after": after,
        "der": der(before, after),
        "wall_seconds": wall,
        "ca_drop_points": 100 * (before["clean_accuracy"] - after["clean_accuracy"]),
        "kept": result.kept["tag"],
        "target_l1_before": float(scan.reversed.mask_l1[target]),
        "target_l1_after": float(again.mask_l1[0]),
        "target_index_after": float(anomaly_index(norms, args.scale, args.statistic)[target]),
        "flagged_after": target in flag_small(norms, args.threshold, args.scale, args.statistic),
        "rereverse_seconds": again.seconds,
    }
    print(
        f"  pipeline: tar-ewc with the reversed trigger of class {target}: true-trigger ASR "
        f"{before['attack_success_rate']:.4f} -> {after['attack_success_rate']:.4f}, "
        f"CA {before['clean_accuracy']:.4f} -> "
        f"{after['clean_accuracy']:.4f} (drop {out['ca_drop_points']:.2f} points), RA {after['robust_accuracy']:.4f}, "
        f"{wall:.0f}s, kept {out['kept']}; "
        f"target reversed again: L1 {out['target_l1_before']:.2f} -> {out['target_l1_after']:.2f}, "
        f"index {out['target_index_after']:.2f}, {'still flagged' if out['flagged_after'] else 'no longer flagged'}",
        flush=True,
    )
    return out


if __name__ == "__main__":
    main()
