"""A small Vision Transformer on real CIFAR-10 through the whole job: train, explain (TAR), scan, unlearn.

    python -m benchmarks.vit_cifar10 [--epochs 8] [--threads N] [--scan both|backdoored|none] [--recipes all|NAMES]

Two ViTs are trained by `cleanse train`'s engine with its defaults for transformers (AdamW, docs/architectures.md):
one on CIFAR-10 with BadNets 10% poisoning (target 0), one on clean CIFAR-10, same seed and settings. Then, on the
10,000 test images:

- TAR (the explain/unlearn figure, at the default TAR layer) of the backdoored and of the clean ViT on triggered
  images; target (issue 28): backdoored at least 2x the clean model's;
- `cleanse scan` (every detector, full budget, 500 clean test images) of both: verdict and wall time;
- each recipe on a 5% clean subset of the training set (seed 0) with the true trigger: CA, ASR, RA, TAR before and
  after, wall time; target: tar-ewc ASR at most 5% with a CA drop of at most 2 points, TAR falling with ASR.

Prints a table and writes benchmarks/results/vit_cifar10.json and vit_cifar10.md. Models are cached like every
benchmark model (benchmarks/cache/, by configuration hash).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, poison_for, require_cifar, write_results
from benchmarks.train_cifar10 import train_cached
from benchmarks.unlearn_cifar10 import run_timed
from cleanse.data import load_data
from cleanse.data.subset import clean_subset
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import der
from cleanse.engine.layers import tar_layer
from cleanse.engine.measure import measure
from cleanse.jobs import RunSettings, scan
from cleanse.jobs.scan import ScanOptions
from cleanse.models import load_model
from cleanse.recipes import RECIPES

VIT = {"depth": 4, "dim": 96, "heads": 3, "mlp": 192}  # 0.30M parameters; patch 4: an 8x8 token grid
EPOCHS = 8  # the CPU budget of one work session: both models trained side by side on one core each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--models", default="badnets,clean", help="which models to run now; results merge by model")
    parser.add_argument("--scan", choices=("both", "backdoored", "none"), default="both", help="which models to scan")
    parser.add_argument("--recipes", default="all", help="comma-separated recipe names, or all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cifar = require_cifar()
    precision = resolve_precision("auto", torch.device("cpu"))
    settings = {"epochs": args.epochs, "arch": "vit", "arch_args": VIT, "precision": precision}
    doc = _stored(settings)
    doc["machine"] = machine()
    test = load_data(str(cifar / "test"))
    trigger = poison_for(load_data(str(cifar / "train")), "badnets", 0, 0.1, 0)[1]  # the training's trigger (seeded)
    scanned = {"both": ("badnets", "clean"), "backdoored": ("badnets",), "none": ()}[args.scan]
    for kind in args.models.split(","):
        trained = train_cached(kind, 0, 0.1, 0, epochs=args.epochs, arch="vit", arch_args=VIT, log=True)
        doc["models"][kind] = {key: trained[key] for key in ("model", "model_sha256", "train_seconds")}
        model = load_model(trained["model"])
        doc.setdefault("tar_layer", tar_layer(model, model.spec.input_size))
        doc["before"][kind] = measure(model, test, trigger, doc["tar_layer"])
        print(_before_line(kind, doc), flush=True)
        if kind in scanned:
            doc["scan"][kind] = _scan(trained["model"], cifar)
            write_results("vit_cifar10", doc)
        if kind == "badnets":
            names = RECIPES.names() if args.recipes == "all" else [n for n in args.recipes.split(",") if n]
            for name in names:  # stored after each recipe, so a run stopped part-way keeps what it measured
                doc["unlearn"] |= _unlearn(
                    trained["model"], trigger, [name], precision, doc["tar_layer"], doc["before"][kind]
                )
                write_results("vit_cifar10", doc)
        write_results("vit_cifar10", doc)  # after each model, so a later run can add the other
    table = render(doc)
    (RESULTS / "vit_cifar10.md").write_text(table)
    print(table)


def _stored(settings: dict[str, Any]) -> dict[str, Any]:
    """The stored results of the same settings (to merge into), or a fresh document."""
    path = RESULTS / "vit_cifar10.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("settings") == settings:
            return doc
    return {"benchmark": "vit_cifar10", "settings": settings, "models": {}, "before": {}, "scan": {}, "unlearn": {}}


def _before_line(kind: str, doc: dict[str, Any]) -> str:
    m = doc["before"][kind]
    return (
        f"{kind} ViT: CA {m['clean_accuracy']:.4f} ASR {m['attack_success_rate']:.4f} TAR on triggered "
        f"{_f(m['tar'])}, on clean {_f(m['clean_tar'])} (layer {doc['tar_layer']})"
    )


def _scan(model_path: str, cifar: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = scan(ScanOptions(model_path, data=str(cifar / "test"), output=Path(tmp) / "scan"), RunSettings())
        wall = time.perf_counter() - started
    d = result.doc
    # the whole scan.json first, so that nothing below can lose an hour's scan
    (RESULTS / f"vit_cifar10-scan-{Path(model_path).stem}.json").write_text(json.dumps(d, indent=1) + "\n")
    out = {
        "suspected_targets": d["suspected_targets"],
        "unconfirmed": d.get("unconfirmed", []),
        "rule": d.get("rule"),
        "detectors_run": d["detectors_run"],
        "flagged_by": {str(r["index"]): r["flagged_by"] for r in d["classes"] if r["flagged_by"]},
        "detectors": {
            name: {"flagged": det.get("flagged"), "seconds": det.get("seconds")} for name, det in d["detectors"].items()
        },
        "wall_seconds": wall,
    }
    print(f"scan {Path(model_path).name}: {out['suspected_targets']} ({wall:.0f}s)", flush=True)
    return out


def _unlearn(
    model_path: str, trigger: Any, names: list[str], precision: str, layer: str, before: dict[str, Any]
) -> dict[str, Any]:
    cifar = require_cifar()
    train, test = load_data(str(cifar / "train")), load_data(str(cifar / "test"))
    split = clean_subset(train, 0.05, None, 0)
    rows = {}
    for name in names:
        model = load_model(model_path)
        recipe = RECIPES.get(name)
        params = recipe.for_model(model, recipe.resolve_params({}), set())  # unlearn's defaults for this family
        try:
            recipe.check_model(model, params)
        except Exception as refusal:
            rows[name] = {"refused": str(refusal)}
            continue
        result, wall = run_timed(name, params, model, split, trigger, precision, 0, layer)
        after = measure(model, test, trigger, layer)
        rows[name] = {
            "after": after,
            "der": der(before, after),
            "ca_drop_points": 100 * (before["clean_accuracy"] - after["clean_accuracy"]),
            "wall_seconds": wall,
            "kept": result.kept["tag"],
            "params": params,
        }
        print(
            f"{name}: CA {before['clean_accuracy']:.4f}->{after['clean_accuracy']:.4f} "
            f"ASR {before['attack_success_rate']:.4f}->{after['attack_success_rate']:.4f} "
            f"TAR {_f(before['tar'])}->{_f(after['tar'])} {wall:.0f}s kept {result.kept['tag']}",
            flush=True,
        )
    return rows


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"ViT ({doc['settings']['arch_args']}), {doc['settings']['epochs']} epochs, {doc['settings']['precision']}; "
        f"{doc['machine']['cpu']}, torch {doc['machine']['torch']}, {doc['machine']['torch_threads']} threads",
        "",
        "| model | CA | ASR | TAR on triggered (layer) | clean-image TAR | train s |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in doc["before"].items():
        kind = "backdoored (BadNets t0)" if key == "badnets" else "clean"
        lines.append(
            f"| {kind} | {_pct(m['clean_accuracy'])} | {_pct(m['attack_success_rate'])} | {_f(m['tar'])} "
            f"({doc['tar_layer']}) | {_f(m['clean_tar'])} | {doc['models'][key]['train_seconds'] or 0:.0f} |"
        )
    if doc["scan"]:
        lines += ["", "| scan of | suspected | flagged by | wall |", "|---|---|---|---|"]
        for kind, s in doc["scan"].items():
            lines.append(f"| {kind} | {s['suspected_targets']} | {s['flagged_by']} | {s['wall_seconds']:.0f}s |")
    if not doc["unlearn"]:
        return "\n".join(lines) + "\n"
    lines += ["", "| recipe | CA after (drop) | ASR after | RA after | TAR after | DER | wall | kept |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, r in doc["unlearn"].items():
        if "refused" in r:
            lines.append(f"| {name} | refused: {r['refused']} | | | | | | |")
            continue
        a = r["after"]
        lines.append(
            f"| {name} | {_pct(a['clean_accuracy'])} ({r['ca_drop_points']:.2f}) | {_pct(a['attack_success_rate'])} "
            f"| {_pct(a['robust_accuracy'])} | {_f(a['tar'])} | {_f(r['der'], 4)} | {r['wall_seconds']:.0f}s "
            f"| {r['kept']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
