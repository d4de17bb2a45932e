"""Would a logit pre-screen (K-Arm's "arm pre-screening") be a cheaper first pass for the scan? Issue 29 (a).

    python -m benchmarks.prescreen_logits [--n 1000] [--gamma 0.25]

K-Arm (Shen et al., ICML 2021; github.com/PurduePAML/K-ARM_Backdoor_Optimization, main.py: gamma 0.25,
global_theta 0.95, local_theta 0.9) screens candidate target classes before any trigger optimisation from the
clean images' logits alone: a backdoor target's logit is lifted on every input, so it should sit among the top
k = gamma x K logits of nearly every image of the other classes. Its screening code is not in the stored sources, so
the statistic here is our reading of the paper, written from scratch:

    global share(c) = |{x of class != c : c in top_k(f(x))}| / |{x of class != c}|
    label-specific share(c) = max over victim classes v != c of the same share among the images of class v

with k = max(2, round(gamma K)). A class passes the pre-screen at global share >= 0.95 or label-specific share
>= 0.9. One forward pass over `--n` clean images per model, so it costs nothing next to a reversal; the question is
only whether it keeps the true target. Models: the kept CIFAR-10 `cnn` models (benchmarks/models/, real CIFAR-10
test images) and any many-class synthetic model benchmarks/scan_many_classes.py has cached (its clean set).
Writes results/prescreen_logits.json and prescreen_logits-table.md.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from benchmarks.common import CACHE, KEPT_MODELS, RESULTS, machine, require_cifar, write_results
from benchmarks.scan_many_classes import clean_set
from cleanse.data import load_data
from cleanse.engine.evaluate import predict
from cleanse.models import load_model

GLOBAL_THETA = 0.95
LOCAL_THETA = 0.9


def shares(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) global and (K,) label-specific top-k shares of every class (definitions in the module docstring)."""
    num = logits.shape[1]
    in_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(k, 1).indices, True)  # (N, K)
    glob, local = torch.zeros(num), torch.zeros(num)
    for c in range(num):
        other = labels != c
        glob[c] = in_top[other, c].float().mean()
        per_victim = [in_top[labels == v, c].float().mean() for v in labels.unique().tolist() if v != c]
        local[c] = max(per_victim) if per_victim else 0.0
    return glob, local


def rank(values: torch.Tensor, target: int) -> int:
    """1-based rank of `target` when the classes are sorted by `values`, largest first (ties by index)."""
    order = sorted(range(len(values)), key=lambda c: (-float(values[c]), c))
    return order.index(target) + 1


def models(n: int) -> list[dict[str, Any]]:
    """(name, model path, target or None for a clean model, clean images, labels) for every model to screen."""
    found = []
    test = load_data(str(require_cifar() / "test"))
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    for path in sorted(KEPT_MODELS.glob("cnn-*-t*-s*.safetensors")):
        if path.name.endswith(".trigger.safetensors"):
            continue
        attack, target = re.match(r"cnn-(\w+)-t(\d+)-", path.name).groups()  # type: ignore[union-attr]
        found.append(
            {"name": f"CIFAR-10 cnn {attack}", "path": path, "target": int(target), "data": test, "pick": pick}
        )
    for path in sorted(CACHE.glob("many-*.safetensors")):
        match = re.match(r"many-(\d+)-(clean|badnets-t0)-", path.name)
        if match is None or not path.with_suffix(".json").is_file():
            continue
        classes, kind = int(match.group(1)), match.group(2)
        clean = clean_set(classes)
        found.append(
            {
                "name": f"synthetic {classes}-class cnn {'clean' if kind == 'clean' else 'badnets'} ({path.stem[-8:]})",
                "path": path,
                "target": None if kind == "clean" else 0,
                "data": clean,
                "pick": torch.arange(len(clean)),
            }
        )
    return found


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"K-Arm-style logit pre-screen, gamma {doc['settings']['gamma']}, thresholds {GLOBAL_THETA} (global) / "
        f"{LOCAL_THETA} (label-specific); {doc['machine']['cpu']}, torch {doc['machine']['torch']}",
        "",
        "| model | K | k | images | target | target's global share (rank) | its label-specific share (rank) "
        "| highest global / label-specific share | classes passing | target passes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        t = r["target"]
        target_cells = (
            f"{r['target_global']:.2f} ({r['target_global_rank']}) | {r['target_local']:.2f} ({r['target_local_rank']})"
            if t is not None
            else "- | -"
        )
        passes = "-" if t is None else ("yes" if t in r["passing"] else "**no**")
        lines.append(
            f"| {r['name']} | {r['classes']} | {r['k']} | {r['images']} | {t if t is not None else 'clean'} | "
            f"{target_cells} | {r['max_global']:.2f} / {r['max_local']:.2f} | {len(r['passing'])} | {passes} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="CIFAR-10 test images per model")
    parser.add_argument("--gamma", type=float, default=0.25)
    args = parser.parse_args()
    rows = []
    for m in models(args.n):
        images, labels = m["data"].images[m["pick"]], m["data"].labels[m["pick"]]
        logits = predict(load_model(m["path"]), images, return_logits=True)
        num = logits.shape[1]
        k = max(2, round(args.gamma * num))
        glob, local = shares(logits, labels, k)
        passing = [c for c in range(num) if glob[c] >= GLOBAL_THETA or local[c] >= LOCAL_THETA]
        row: dict[str, Any] = {
            "name": m["name"],
            "model": m["path"].name,
            "classes": num,
            "k": k,
            "images": len(labels),
            "target": m["target"],
            "max_global": float(glob.max()),
            "max_local": float(local.max()),
            "passing": passing,
            "global_share": [round(float(v), 4) for v in glob],
            "local_share": [round(float(v), 4) for v in local],
        }
        if m["target"] is not None:
            t = m["target"]
            row |= {
                "target_global": float(glob[t]),
                "target_global_rank": rank(glob, t),
                "target_local": float(local[t]),
                "target_local_rank": rank(local, t),
            }
        rows.append(row)
        print(table({"settings": {"gamma": args.gamma}, "machine": machine(), "rows": [row]}).splitlines()[-1])
    doc = {"benchmark": "prescreen_logits", "settings": {"gamma": args.gamma, "n": args.n}, "machine": machine()}
    doc["rows"] = rows
    write_results("prescreen_logits", doc)
    (RESULTS / "prescreen_logits-table.md").write_text(table(doc))
    print(table(doc))


if __name__ == "__main__":
    main()
