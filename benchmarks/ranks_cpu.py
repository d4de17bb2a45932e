"""torchrun on the CPU: `train`, `unlearn` (one recipe's batches split; `--method all`, whole recipes per rank) and
`scan` (classes split) with 2 ranks of one thread each against one process with two threads, on the synthetic set.

    python -m benchmarks.ranks_cpu [--table]

For each case: wall time of both runs (start-up included: torchrun and every rank import torch) and how far the
2-rank result is from the one-process one: the largest weight difference of the written model(s), the largest
difference of the run record's history figures, and for the scan the largest relative difference of scan.json's
per-class statistics and whether the verdict is the same. gloo, fp32. Writes results/ranks_cpu.json and
ranks_cpu-table.md. Run it on an idle machine: both sides use both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks.common import RESULTS, machine, write_results
from cleanse.attacks import poison_dataset
from cleanse.data.synthetic import make_synthetic
from cleanse.models import new_model, save_model
from cleanse.training_defaults import data_normalization

VIT = {"depth": 2, "dim": 64, "heads": 4, "mlp": 128}
COMMON = ["--device", "cpu", "--precision", "fp32", "--json", "-q"]
CASES: dict[str, list[str]] = {
    "train vit (2 epochs, batch 128)": [
        "train", "synthetic", "--arch", "vit", *(a for k, v in VIT.items() for a in ("--arch-arg", f"{k}={v}")),
        "--epochs", "2", "--batch-size", "128", "-o", "OUT.safetensors",
    ],
    "unlearn tar-ewc cnn (batches split)": [
        "unlearn", "cnn.safetensors", "--data", "synthetic", "--clean-frac", "0.1", "--method", "tar-ewc",
        "--trigger", "t.safetensors", "--param", "epochs=2", "--param", "recovery_epochs=1", "-o", "OUT.safetensors",
    ],
    "unlearn finetune vit (batches split)": [
        "unlearn", "vit.safetensors", "--data", "synthetic", "--clean-frac", "0.1", "--method", "finetune",
        "--epochs", "3", "--param", "ca_margin=1", "-o", "OUT.safetensors",
    ],
    "unlearn --method all cnn (whole recipes per rank)": [
        "unlearn", "cnn.safetensors", "--data", "synthetic", "--clean-frac", "0.05", "--method", "all",
        "--trigger", "t.safetensors", "--epochs", "1", "-o", "OUT.safetensors",
    ],
    "scan cnn, every detector (classes split)": [
        "scan", "cnn.safetensors", "--data", "synthetic", "--budget", "fast", "--steps", "40", "-o", "OUT",
    ],
}  # fmt: skip


def inputs(folder: Path) -> None:
    """The models the cases start from: a `cnn` trained 3 epochs on BadNets-poisoned synthetic data (a backdoor to
    remove and to find), its trigger, and an untrained ViT."""
    from cleanse.engine.train import TrainConfig, train_model

    poisoned, trigger = poison_dataset(make_synthetic("train"), "badnets", 0, 0.1, seed=0)
    trigger.save(folder / "t.safetensors")
    mean, std = data_normalization(poisoned)
    cnn = new_model("cnn", 10, poisoned.classes, (3, 32, 32), mean, std, {"width": "16,32,32"}, seed=0)
    train_model(cnn, poisoned, TrainConfig(epochs=3, precision="fp32"))
    save_model(cnn, folder / "cnn.safetensors")
    save_model(
        new_model("vit", 10, poisoned.classes, (3, 32, 32), mean, std, dict(VIT), seed=0), folder / "vit.safetensors"
    )


def run(folder: Path, args: list[str], out: str, ranks: int) -> float:
    argv = [a.replace("OUT", out) for a in args] + COMMON
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = (launcher if ranks > 1 else [sys.executable]) + ["-m", "cleanse", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // ranks), CLEANSE_CACHE_DIR=str(folder / "cache"))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def _weights_gap(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _history_gap(a: Path, b: Path) -> float | None:
    """The largest difference of a history figure, or None when the two runs took different paths (a different number
    of rows: a decision such as an early stop fell the other way)."""
    ha, hb = (json.loads(p.read_text())["history"] for p in (a, b))
    if len(ha) != len(hb):
        return None
    gaps = [0.0]
    for ra, rb in zip(ha, hb, strict=True):
        for key, value in ra.items():
            if key != "elapsed" and isinstance(value, float) and isinstance(rb.get(key), float):
                gaps.append(abs(value - rb[key]))
    return max(gaps)


def compare(folder: Path, name: str, one: str, two: str) -> dict[str, Any]:
    if name.startswith("scan"):
        a, b = (json.loads((folder / o / "scan.json").read_text()) for o in (one, two))
        rel = [0.0]
        for det in a["detectors"]:
            for ca, cb in zip(a["detectors"][det]["classes"], b["detectors"][det]["classes"], strict=True):
                rel.append(abs(ca["statistic"] - cb["statistic"]) / max(abs(ca["statistic"]), 1e-12))
        same = a["suspected_targets"] == b["suspected_targets"]
        return {"same_verdict": same, "suspected": a["suspected_targets"], "statistic_rel_gap": max(rel)}
    models = sorted(p.name for p in folder.glob(f"{one}*.safetensors"))
    per_model = {}
    for m in models:
        other = m.replace(one, two, 1)
        history = _history_gap(folder / f"{m}.run.json", folder / f"{other}.run.json")
        per_model[m.removeprefix(one).removesuffix(".safetensors").strip(".")] = {
            "weights_gap": _weights_gap(folder / m, folder / other),
            "history_gap": history,
        }
    same_path = [v["history_gap"] for v in per_model.values() if v["history_gap"] is not None]
    return {
        "models": len(models),
        "weights_gap": max(v["weights_gap"] for v in per_model.values()),
        "history_gap": max(same_path) if same_path else None,
        "other_path": sorted(k or "model" for k, v in per_model.items() if v["history_gap"] is None),
        "per_model": per_model,
    }


def table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"{m['cpu']}, torch {m['torch']}; one process with 2 threads against torchrun with 2 ranks of 1 thread (gloo), "
        "fp32, synthetic set; wall times include start-up",
        "",
        "| case | 1 process s | 2 ranks s | ratio | agreement |",
        "|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        c = row["comparison"]
        if "error" in c:
            agree = f"not compared: {c['error']}"
        elif "same_verdict" in c:
            verdict = "same" if c["same_verdict"] else "DIFFERENT"
            agree = f"verdict {verdict} ({c['suspected']}), statistics within {c['statistic_rel_gap']:.1e} relative"
        else:
            history = "-" if c["history_gap"] is None else f"{c['history_gap']:.1e}"
            agree = f"{c['models']} model(s): weights within {c['weights_gap']:.1e}, history figures within {history}"
            if c.get("other_path"):
                agree += f"; a decision fell the other way in: {', '.join(c['other_path'])}"
        lines.append(
            f"| {row['case']} | {row['one_seconds']:.1f} | {row['two_seconds']:.1f} | "
            f"{row['two_seconds'] / row['one_seconds']:.2f} | {agree} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only print the stored table")
    parser.add_argument("--cases", default="", help="comma-separated case numbers (0-based) to (re)run; default all")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads((RESULTS / "ranks_cpu.json").read_text())))
        return
    torch.set_num_threads(2)
    doc: dict[str, Any] = {"benchmark": "ranks_cpu", "machine": machine(), "rows": []}
    chosen = {int(c) for c in args.cases.split(",") if c} or set(range(len(CASES)))
    stored = RESULTS / "ranks_cpu.json"
    if chosen != set(range(len(CASES))) and stored.is_file():  # rerun some cases: keep the others' rows
        doc["rows"] = [r for r in json.loads(stored.read_text())["rows"] if list(CASES).index(r["case"]) not in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs(folder)
        for i, (case, argv) in enumerate(CASES.items()):
            if i not in chosen:
                continue
            one, two = f"c{i}one", f"c{i}two"
            row = {"case": case, "one_seconds": run(folder, argv, one, 1), "two_seconds": run(folder, argv, two, 2)}
            try:
                row["comparison"] = compare(folder, case, one, two)
            except (
                KeyError,
                ValueError,
                OSError,
            ) as failed:  # keep the timings of a case whose outputs differ in shape
                row["comparison"] = {"error": repr(failed)}
            doc["rows"].append(row)
            doc["rows"].sort(key=lambda r: list(CASES).index(r["case"]))
            write_results("ranks_cpu", doc)
            print(f"{case}: {row['one_seconds']:.1f}s vs {row['two_seconds']:.1f}s {row['comparison']}", flush=True)
    text = table(doc)
    (RESULTS / "ranks_cpu-table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
