"""Every unlearning recipe on real CIFAR-10 backdoored `cnn` models, side by side.

For each model (attack:target:seed, trained by benchmarks/train_cifar10.py and
cached) and each recipe: `--clean-frac 0.05` of the training set drawn with the
model's seed, the true trigger, the recipe's defaults (or `--param`), then CA,
ASR, RA, TAR and DER on the 10,000 test images (ASR/RA on the non-target ones),
the recipe's wall time, and that time as a share of training the model from
scratch. Training time is measured in the same run, right before the recipes:
one epoch of `cleanse train`'s default configuration on the first model's
poisoned set, times the default number of epochs (`--calibrate-frac F` times the
epoch on a random F of that set and divides by F, for slow machines where one
epoch takes many minutes; `--no-calibrate` uses each cached model's own
training time, which may come from a faster or slower hour).

Rows are appended to results/unlearn_cifar10-rows.jsonl as they finish (a row
already there for the same model, recipe and parameters is skipped unless
`--redo`), so a long campaign can be run in pieces; `--table` prints the
recipe x attack table from every stored row and writes
results/unlearn_cifar10-table.json and .md.

    python -m benchmarks.unlearn_cifar10 [--models badnets:0:0,blended:1:0] [--recipes tar-ewc,finetune]
                                         [--param tar-ewc.lr=0.005] [--threads 1] [--redo]
    python -m benchmarks.unlearn_cifar10 --table

Targets: issue 4 (tar-ewc, BadNets and Blended): ASR <= 2%, CA retention >= 99.5%,
wall <= 5% of training. Issue 5 (every recipe, BadNets and Blended): ASR <= 5%
with a CA drop of at most 2 points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
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
from cleanse.attacks import load_trigger
from cleanse.data import load_data
from cleanse.data.subset import clean_subset
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import der, predict
from cleanse.engine.layers import tar_layer
from cleanse.engine.measure import measure
from cleanse.models import load_model
from cleanse.recipes import RECIPES, RecipeContext

ROWS = RESULTS / "unlearn_cifar10-rows.jsonl"
RECIPE_ORDER = (
    "finetune",
    "tar-ewc",
    "ulrl",
    "grad-prune",
    "act-edit",
    "sau",
    "fine-prune",
    "nad",
    "anp",
    "i-bau",
    "clp",
)
ATTACK_ORDER = ("badnets", "blended", "sig", "wanet")
# BackdoorBench's CIFAR-10 PreAct-ResNet18 leaderboard (10% poisoning, SIG 5%), CA / ASR % as issue 31 quotes it: the
# reference for the recipes it also runs. "none" is the undefended model, from which its CA drops are taken.
BACKDOORBENCH = {
    "none": {"badnets": (91.3, 95.0), "blended": (93.5, 99.9), "sig": (93.6, 97.1), "wanet": (91.3, 89.7)},
    "fine-prune": {"badnets": (91.3, 57.1), "blended": (93.2, 99.3), "sig": (93.3, 99.8), "wanet": (91.5, 1.1)},
    "nad": {"badnets": (89.9, 2.1), "blended": (92.2, 97.7), "sig": (92.5, 97.0), "wanet": (93.2, 23.0)},
    "anp": {"badnets": (84.2, 0.7), "blended": (86.6, 2.2), "sig": (86.6, 0.2), "wanet": (85.7, 0.4)},
    "i-bau": {"badnets": (89.2, 1.3), "blended": (87.0, 50.5), "sig": (86.1, 3.5), "wanet": (89.5, 5.2)},
    "clp": {"badnets": (90.1, 77.6), "blended": (91.3, 99.7), "sig": (93.2, 97.2), "wanet": (81.9, 78.4)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="attack:target:seed, comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPE_ORDER))
    parser.add_argument("--param", action="append", default=[], help="RECIPE.NAME=VALUE (repeatable)")
    parser.add_argument("--clean-frac", type=float, default=0.05)
    parser.add_argument(
        "--subset-seeds",
        default=None,
        help="seeds for the clean-subset draw and the recipe, comma-separated (default: the model's own seed)",
    )
    parser.add_argument(
        "--test-n",
        type=int,
        default=None,
        help="report on a class-stratified sample of this many test images (tuning runs; default: all 10,000)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-calibrate", action="store_true", help="use the cached models' own training times")
    parser.add_argument(
        "--calibrate-frac",
        type=float,
        default=1.0,
        help=(
            "time the calibration epoch on this random share of the poisoned set and divide by it "
            "(default 1: the whole epoch)"
        ),
    )
    parser.add_argument("--redo", action="store_true", help="run rows that are already stored again")
    parser.add_argument("--table", action="store_true", help="only print the table of every stored row")
    parser.add_argument("--rows", default=str(ROWS), help="the JSONL file rows are appended to and read from")
    args = parser.parse_args()
    rows_file = Path(args.rows)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        table(load_rows(rows_file), write=rows_file == ROWS)
        return
    run(args, rows_file)
    table(load_rows(rows_file), write=rows_file == ROWS)


def run(args: argparse.Namespace, rows_file: Path) -> None:
    cifar = require_cifar()
    train = load_data(str(cifar / "train"))
    test = load_data(str(cifar / "test"))
    if args.test_n:
        test = clean_subset(test, n=args.test_n, seed=0, hold_back=0.0).train
    precision = resolve_precision("auto", torch.device("cpu"))
    overrides = parse_overrides(args.param)
    done = {r["key"] for r in load_rows(rows_file)} if not args.redo else set()
    calibrated: float | None = None
    for attack, target, seed in parse_models(args.models):
        trained = train_cached(attack, target, 0.1, seed, log=False)
        if args.no_calibrate:
            train_seconds = trained["train_seconds"]
        elif calibrated is None:
            calibrated = train_seconds = training_seconds(train, attack, target, seed, args.calibrate_frac)
            print(
                f"training from scratch, measured now: {train_seconds:.0f}s (10 x one epoch on {attack} s{seed}"
                f"{'' if args.calibrate_frac == 1 else f', timed on {args.calibrate_frac:.0%} of it'})",
                flush=True,
            )
        else:
            train_seconds = calibrated
        trigger = load_trigger(trained["trigger"])
        before: dict[str, Any] | None = None  # the same model on the same test images: measured once
        subset_seeds = [int(v) for v in args.subset_seeds.split(",")] if args.subset_seeds else [seed]
        # recipe-major, so an interrupted campaign leaves whole recipe cells (every seed) rather than whole seed columns
        for subset_seed, name in ((u, n) for n in args.recipes.split(",") for u in subset_seeds):
            split = clean_subset(train, args.clean_frac, None, subset_seed)
            recipe = RECIPES.get(name)
            params = recipe.resolve_params(overrides.get(name, {}))
            key = config_hash(
                {
                    "model": [attack, target, seed],
                    "model_sha256": trained["model_sha256"],
                    "recipe": name,
                    "params": params,
                    "clean_frac": args.clean_frac,
                    **({"test_n": args.test_n} if args.test_n else {}),
                    **({"subset_seed": subset_seed} if subset_seed != seed else {}),
                }
            )
            if key in done:
                print(
                    f"{attack} t{target} s{seed} u{subset_seed} {name}: stored already (--redo to run again)",
                    flush=True,
                )
                continue
            model = load_model(trained["model"])
            layer = tar_layer(model, model.spec.input_size)
            if before is None:
                before = measured(
                    model, test, trigger, layer
                )  # per_class_accuracy included (older rows: per_class_ca; results/README.md)
            load_before = os.getloadavg()[0]
            result, wall = run_timed(name, params, model, split, trigger, precision, subset_seed, layer)
            after = measured(model, test, trigger, layer)
            row = {
                "key": key,
                "attack": attack,
                "target": target,
                "seed": seed,
                "model_sha256": trained["model_sha256"],
                "subset_seed": subset_seed,
                "recipe": name,
                "params": params,
                "overridden": overrides.get(name, {}),
                "clean_frac": args.clean_frac,
                "test_n": len(test),
                "n_train": len(split.train),
                "n_held": len(split.held),
                "before": before,
                "after": after,
                "der": der(before, after),
                "ca_retention": after["clean_accuracy"] / before["clean_accuracy"],
                "ca_drop_points": 100 * (before["clean_accuracy"] - after["clean_accuracy"]),
                "wall_seconds": wall,
                "train_seconds": train_seconds,
                "calibrated": not args.no_calibrate,
                "calibration_fraction": None if args.no_calibrate else args.calibrate_frac,
                "cached_train_seconds": trained["train_seconds"],
                "wall_share_of_training": wall / train_seconds,
                "kept": result.kept.get("tag"),
                "rollbacks": result.kept.get("rollbacks", []),
                "extra": _plain(result.extra),
                "history": result.history,
                "precision": precision,
                "machine": machine(),
                "load_average": [load_before, os.getloadavg()[0]],
            }
            append_row(rows_file, row)
            print(
                f"{attack:8} t{target} s{seed} u{subset_seed} {name:10} "
                f"CA {before['clean_accuracy']:.4f}->{after['clean_accuracy']:.4f} "
                f"ASR {before['attack_success_rate']:.4f}->{after['attack_success_rate']:.4f} "
                f"RA {after['robust_accuracy']:.4f} "
                f"TAR {_f(before['tar'])}->{_f(after['tar'])} DER {row['der']:.4f} ret {row['ca_retention']:.4f} "
                f"{wall:.0f}s ({100 * row['wall_share_of_training']:.1f}% of training) kept {row['kept']}",
                flush=True,
            )


def run_timed(
    name: str, params: dict[str, Any], model: Any, split: Any, trigger: Any, precision: str, seed: int, layer: str
) -> tuple[Any, float]:
    """Run one recipe on `model` in place (left in eval mode); its result and its own wall time, nothing else timed."""
    ctx = RecipeContext(
        model, split, trigger, params, callback=lambda e: None, precision=precision, seed=seed, tar_layer=layer
    )
    started = time.perf_counter()
    result = RECIPES.get(name).run(ctx)
    wall = time.perf_counter() - started
    model.eval()
    return result, wall


def measured(model, test, trigger, layer: str) -> dict[str, Any]:
    """`cleanse unlearn`'s before/after figures plus the clean confusion matrix (rows: true class, columns:
    predicted; rows written before this was added lack it), which shows where a class's lost accuracy went."""
    out = measure(model, test, trigger, layer)
    preds, n = predict(model, test.images), model.spec.num_classes
    out["confusion"] = torch.bincount(test.labels.long() * n + preds, minlength=n * n).view(n, n).tolist()
    return out


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, _, value = item.partition("=")
        recipe, _, param = name.partition(".")
        if not param or not value:
            raise SystemExit(f"--param {item!r}: expected RECIPE.NAME=VALUE, e.g. tar-ewc.lr=0.005")
        out.setdefault(recipe, {})[param] = value
    return out


def training_seconds(train, attack: str, target: int, seed: int, fraction: float = 1.0) -> float:
    """One epoch of the default training configuration, timed now, times the default epoch count.

    With `fraction` < 1 the epoch runs on that random share of the poisoned set and its time is divided by
    `fraction`: a training step costs the same whatever images it holds, so only the first batches' warm-up and
    the one-off set-up (the whitening statistics) are over-weighted, by 1/fraction. The batch size is the whole
    set's (512 for CIFAR-10), not the one a small share would get (rows timed before that fix: results/README.md)."""
    from cleanse.attacks import poison_dataset
    from cleanse.engine.train import TrainConfig, train_model
    from cleanse.models import new_model
    from cleanse.training_defaults import data_normalization

    if not 0 < fraction <= 1:
        raise SystemExit(f"--calibrate-frac {fraction}: must be in (0, 1]")
    poisoned = train if attack == "clean" else poison_dataset(train, attack, target, 0.1, seed=seed)[0]
    batch_size = TrainConfig().resolved(True, len(poisoned)).batch_size  # the whole set's batch, not the share's
    if fraction < 1:
        keep = torch.randperm(len(poisoned), generator=torch.Generator().manual_seed(seed))[
            : round(fraction * len(poisoned))
        ]
        poisoned = poisoned.subset(keep.sort().values)
    mean, std = data_normalization(poisoned)
    model = new_model("cnn", poisoned.num_classes, poisoned.classes, (3, 32, 32), mean, std, seed=seed)
    config = TrainConfig(
        seed=seed, epochs=1, batch_size=batch_size, precision=resolve_precision("auto", torch.device("cpu"))
    )
    started = time.perf_counter()
    train_model(model, poisoned, config)
    return (time.perf_counter() - started) / fraction * TrainConfig().epochs


def _setup(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a wall time depends on besides the work: the CPU, precision and thread count of the run."""
    m = row.get("machine") or {}
    return m.get("cpu"), row.get("precision"), m.get("torch_threads"), row.get("calibration_fraction", 1.0)


def _mixed(cell: dict[str, Any]) -> str:
    return "*" if cell["setups"] > 1 else ""


def table(rows: list[dict[str, Any]], write: bool = True) -> None:
    """Recipe x attack, default parameters only: mean over seeds of CA/ASR/RA after, DER and wall time."""
    if write:  # the published table: default parameters, the whole test set
        rows = [r for r in rows if not r["overridden"] and r.get("test_n", 10000) == 10000 and _todays_defaults(r)]
    if not rows:
        print("no stored rows with default parameters")
        return
    attacks = [a for a in ATTACK_ORDER if any(r["attack"] == a for r in rows)]
    recipes = [n for n in RECIPE_ORDER if any(r["recipe"] == n for r in rows)]
    cells: dict[str, dict[str, Any]] = {}
    lines = ["| recipe | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    before_cells = []
    for attack in attacks:
        sel = [r for r in rows if r["attack"] == attack]
        by_model = {(r["target"], r["seed"]): r["before"] for r in sel}
        before_cells.append(
            f"{_pct(_mean(b['clean_accuracy'] for b in by_model.values()))} / "
            f"{_pct(_mean(b['attack_success_rate'] for b in by_model.values()))} / "
            f"{_pct(_mean(b['robust_accuracy'] for b in by_model.values()))} (n={len(by_model)})"
        )
    lines.append("| (before) | " + " | ".join(before_cells) + " |")
    for name in recipes:
        parts = []
        for attack in attacks:
            sel = [r for r in rows if r["attack"] == attack and r["recipe"] == name]
            if not sel:
                parts.append("-")
                continue
            cell = {
                "n": len(sel),
                "runs": sorted((r["seed"], r.get("subset_seed", r["seed"])) for r in sel),
                "models": len({(r["target"], r["seed"]) for r in sel}),
                "ca": _mean(r["after"]["clean_accuracy"] for r in sel),
                "asr": _mean(r["after"]["attack_success_rate"] for r in sel),
                "asr_max": max(r["after"]["attack_success_rate"] for r in sel),
                "ra": _mean(r["after"]["robust_accuracy"] for r in sel),
                "der": _mean(r["der"] for r in sel),
                "ca_drop_points": _mean(r["ca_drop_points"] for r in sel),
                "ca_drop_max": max(r["ca_drop_points"] for r in sel),
                "retention_min": min(r["ca_retention"] for r in sel),
                "wall": _mean(r["wall_seconds"] for r in sel),
                "wall_share": _mean(r["wall_share_of_training"] for r in sel),
                "asr_sd": statistics.pstdev([r["after"]["attack_success_rate"] for r in sel]),
                "ca_sd": statistics.pstdev([r["after"]["clean_accuracy"] for r in sel]),
                "setups": len({_setup(r) for r in sel}),
            }
            cells[f"{name}/{attack}"] = cell
            parts.append(
                f"{_pct(cell['ca'])} / {_pct(cell['asr'])} / {_pct(cell['ra'])} / "
                f"{cell['der']:.3f} / {cell['wall']:.0f}s{_mixed(cell)}" + f" (n={cell['n']})"
            )
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    detail = [
        "| attack | recipe | runs (models) | CA drop, points (mean, max) | ASR after (mean, max) | "
        "CA retention (min) | "
        "wall (share of training) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in cells.items():
        name, attack = key.split("/")
        detail.append(
            f"| {attack} | {name} | {c['n']} ({c['models']}) | {c['ca_drop_points']:.2f}, {c['ca_drop_max']:.2f} | "
            f"{_pct(c['asr'])}, {_pct(c['asr_max'])} | {c['retention_min']:.4f} | "
            f"{c['wall']:.0f}s{_mixed(c)} ({100 * c['wall_share']:.1f}%) |"
        )
    per_run = [
        "| attack | model seed | subset seed | recipe | CA before -> after | ASR before -> after | RA after | "
        "TAR before -> after | DER | CA retention | wall | % of training | state kept |",
        "|---" * 13 + "|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            ATTACK_ORDER.index(r["attack"]) if r["attack"] in ATTACK_ORDER else 99,
            r["seed"],
            r.get("subset_seed", r["seed"]),
            RECIPE_ORDER.index(r["recipe"]),
        ),
    ):
        b, a = r["before"], r["after"]
        tar = f"{b['tar']:.2f} -> {a['tar']:.2f}" if b.get("tar") is not None and a.get("tar") is not None else "-"
        per_run.append(
            f"| {r['attack']} | {r['seed']} | {r.get('subset_seed', r['seed'])} | {r['recipe']} | "
            f"{_pct(b['clean_accuracy'])} -> {_pct(a['clean_accuracy'])} | "
            f"{_pct(b['attack_success_rate'])} -> {_pct(a['attack_success_rate'])} | "
            f"{_pct(a['robust_accuracy'])} | {tar} | "
            f"{r['der']:.3f} | {r['ca_retention']:.4f} | "
            f"{r['wall_seconds']:.0f} s | {100 * r['wall_share_of_training']:.1f}% | "
            f"{r.get('kept') or '-'} |"
        )
    text = (
        "Cells: CA / ASR / RA after (mean over runs) / DER / recipe wall time "
        "(n = runs: models x clean-subset seeds).\n"
        "A wall time marked * averages runs from more than one machine, precision, thread count or calibration share: "
        "compare its share of training (calibrated in each run) rather than its seconds.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(detail)
        + "\n\n"
        + against_backdoorbench(cells)
        + "\n\nEvery run counted above:\n\n"
        + "\n".join(per_run)
    )
    print(text)
    if not write:
        return
    write_results("unlearn_cifar10-table", {"benchmark": "unlearn_cifar10", "cells": cells, "rows": len(rows)})
    (RESULTS / "unlearn_cifar10-table.md").write_text(text + "\n")


def against_backdoorbench(cells: dict[str, dict[str, Any]]) -> str:
    """Each recipe BackdoorBench also runs, per attack: its leaderboard CA drop and ASR against ours (mean over runs).
    Met: our ASR at most BackdoorBench's, at a CA drop no larger than BackdoorBench's (issue 31's target)."""
    lines = [
        "Against BackdoorBench (PreAct-ResNet18; its CA drop from its undefended row). Met: ASR no higher, at a CA "
        "drop no larger.",
        "",
        "| recipe | attack | runs | BackdoorBench CA drop / ASR | ours CA drop / ASR (max) | ASR | CA drop | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in RECIPE_ORDER if n in BACKDOORBENCH):
        for attack in ATTACK_ORDER:
            cell = cells.get(f"{name}/{attack}")
            if cell is None:
                continue
            bb_ca, bb_asr = BACKDOORBENCH[name][attack]
            bb_drop = BACKDOORBENCH["none"][attack][0] - bb_ca
            asr, drop = 100 * cell["asr"], cell["ca_drop_points"]
            asr_ok, drop_ok = asr <= bb_asr, drop <= bb_drop
            lines.append(
                f"| {name} | {attack} | {cell['n']} | {bb_drop:.1f} / {bb_asr:.1f} | "
                f"{drop:.2f} ({cell['ca_drop_max']:.2f}) / "
                f"{asr:.2f} ({100 * cell['asr_max']:.2f}) | {asr - bb_asr:+.2f} | {drop - bb_drop:+.2f} | "
                f"{_verdict(asr_ok, drop_ok)} |"
            )
    return "\n".join(lines)


def _verdict(asr_ok: bool, drop_ok: bool) -> str:
    if asr_ok and drop_ok:
        return "**met**"
    if asr_ok:
        return "ASR met, CA drop larger"
    return "ASR higher, CA drop smaller" if drop_ok else "missed both"


def _todays_defaults(row: dict[str, Any]) -> bool:
    """Whether a stored row ran the recipe as it is configured today: every parameter it recorded still exists with
    that value as its default, and it records every parameter whose introduction changed the default behaviour
    (`Param.changed_default_when_added`; any other parameter added since defaults to the behaviour before it)."""
    params = RECIPES.get(row["recipe"]).params
    if not {k for k, p in params.items() if p.changed_default_when_added} <= set(row["params"]):
        return False
    return all(k in params and params[k].default == v for k, v in row["params"].items())


def _mean(values: Any) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _plain(extra: dict[str, Any]) -> dict[str, Any]:
    """The recipe's extra figures, JSON-safe."""
    return json.loads(json.dumps(extra, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


if __name__ == "__main__":
    main()
