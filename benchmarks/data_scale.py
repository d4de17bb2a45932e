"""Peak memory of `poison`, `scan` and `unlearn` on an ImageFolder of 224-pixel JPEGs against the number of images
(issue 29 (b): flat in N beyond the cache file, at most 2 GiB).

    python -m benchmarks.data_scale [--sizes 2000,10000,20000] [--side 224] [--threads 2]
    python -m benchmarks.data_scale --table

For each N, an ImageFolder of N JPEGs (10 classes, smooth random images; built once under benchmarks/cache/,
a larger folder reuses the files of a smaller one by hard links) is read by the real CLI, each command in its own
process, with its own decode cache (CLEANSE_CACHE_DIR under benchmarks/cache/), in this order:

1. `poison` on a cold cache: decodes every image and writes the cache file, then writes the poisoned set;
2. `poison` again (the cache is read, memory-mapped);
3. `scan MODEL --data FOLDER` with the patch detector, a short budget and a 1 GiB step budget (`--steps 10
   --n-clean 200 --memory-budget 1GiB`: by default a step may take half the free memory, which is the reversal's
   working memory, not the data's);
4. `unlearn MODEL --data FOLDER --method finetune --clean-frac 0.05 --epochs 1`: its batches of 128 stepped in
   pieces that fit a CPU forward (256 MiB of saved tensors, `RecipeRun.step_pieces`), then the same with whole
   batches as before the pieces ("whole batches": the CPU cap lifted in that process only), then with `--param
   batch_size=64`;
5. `unlearn MODEL ... --method tar-ewc --trigger T --epochs 1`, the default recipe, with the trigger step 1 wrote
   (only when `poison` is measured too).

MODEL is an untrained `cnn` of widths 8,16,16 at 224x224 (memory, not verdicts, is measured here). The parent
samples each process's /proc/PID/status every 20 ms: peak VmRSS, peak RssAnon (memory the process owns: the
figure that must stay flat in N) and peak RssFile (pages of mapped files, the cache and the model, that the
kernel can drop and re-read at will). Linux only. Writes results/data_scale.json and data_scale-table.md
(`--tag T`: data_scale-T.json and data_scale-T-table.md, for another machine's rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import CACHE, RESULTS, machine, write_results
from cleanse.models import new_model, save_model

CLASSES = 10
MIB = 1024 * 1024
# `python -m cleanse` with the CPU forward cap lifted: unlearn's batches in one forward each, as before the pieces
WHOLE_BATCHES = "import cleanse.engine.memory as m; m.CPU_FORWARD_BYTES = 2**62; from cleanse.cli import main; main()"


def _image(rng: np.random.Generator, label: int, side: int) -> np.ndarray:
    """A smooth random image with a class tint: low-resolution noise upsampled, so the JPEG is of a natural size."""
    low = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)).astype(np.int16)
    img[..., label % 3] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def image_folder(n: int, side: int) -> Path:
    """benchmarks/cache/folder-SIDE-N: N JPEGs, N/10 per class; files shared (hard links) with the largest folder."""
    root = CACHE / f"folder-{side}-{n}"
    if (root / ".complete").is_file():
        return root
    pool = CACHE / f"folder-{side}-pool"
    rng = np.random.default_rng(0)
    per_class = n // CLASSES
    shutil.rmtree(root, ignore_errors=True)
    for label in range(CLASSES):
        (pool / f"class{label}").mkdir(parents=True, exist_ok=True)
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            name = f"class{label}/{i:06d}.jpg"
            source = pool / name
            if not source.is_file():
                Image.fromarray(_image(rng, label, side)).save(source, quality=90)
            os.link(source, root / name)
    (root / ".complete").write_text(str(n))
    return root


def tiny_model(side: int) -> Path:
    path = CACHE / f"data-scale-cnn-{side}.safetensors"
    if not path.is_file():
        model = new_model("cnn", CLASSES, None, (3, side, side), None, None, {"width": "8,16,16"}, seed=0)
        save_model(model, path)
    return path


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return fields


def measured(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one CLI command; its wall time, CPU time (user + system: what contention does not inflate much, unlike the
    wall time) and peak memory figures (MiB). Exit 0 or 1 (scan: suspected) are fine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    while proc.poll() is None:
        for key, value in _status(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{err[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command is reaped by now: its time is in `after`
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mib": peak["VmRSS"] / MIB,
        "peak_rss_hwm_mib": peak["VmHWM"] / MIB,
        "peak_anon_mib": peak["RssAnon"] / MIB,
        "peak_file_mib": peak["RssFile"] / MIB,
    }


def run_size(n: int, side: int, threads: int, commands: set[str]) -> dict[str, Any]:
    folder = image_folder(n, side)
    model = tiny_model(side)
    cache = CACHE / f"data-scale-decode-{side}-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "CLEANSE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(threads)}
    cli = [sys.executable, "-m", "cleanse"]
    row: dict[str, Any] = {"n": n, "side": side, "commands": {}}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp)
        poison = [*cli, "poison", str(folder), "--attack", "badnets", "--rate", "0.1", "-o", str(out / "p.safetensors")]
        finetune = [
            "unlearn", str(model), "--data", str(folder), "--method", "finetune", "--clean-frac", "0.05", "--epochs",
            "1", "-o", str(out / "u.safetensors"), "--force",
        ]  # fmt: skip
        steps = {
            "poison (cold cache)": poison,
            "poison": [*poison, "--force"],
            "scan": [
                *cli, "scan", str(model), "--data", str(folder), "--detectors", "patch", "--steps", "10",
                "--n-clean", "200", "--memory-budget", "1GiB", "-o", str(out / "scan"),
            ],
            "unlearn": [*cli, *finetune],
            "unlearn whole batches": [sys.executable, "-c", WHOLE_BATCHES, *finetune],
            "unlearn batch 64": [*cli, *finetune, "--param", "batch_size=64"],
            "unlearn tar-ewc": [
                *cli, "unlearn", str(model), "--data", str(folder), "--clean-frac", "0.05", "--epochs", "1",
                "--trigger", str(out / "p.trigger.safetensors"), "-o", str(out / "t.safetensors"),
            ],
        }  # fmt: skip
        for name, argv in steps.items():
            if {name, name.split(" ")[0]}.isdisjoint(commands) or (
                name == "unlearn tar-ewc" and "poison" not in commands
            ):
                continue
            row["commands"][name] = measured(argv, env)
            print(f"N={n:>6} {name:20} " + _cells(row["commands"][name]), flush=True)
        row["cache_file_mib"] = sum(f.stat().st_size for f in cache.glob("*.safetensors")) / MIB
        if "poison" in commands:
            row["poisoned_file_mib"] = (out / "p.safetensors").stat().st_size / MIB
    shutil.rmtree(cache, ignore_errors=True)
    return row


def _cells(m: dict[str, Any]) -> str:
    return (
        f"anon {m['peak_anon_mib']:7.0f} MiB  file {m['peak_file_mib']:7.0f} MiB  "
        f"rss {m['peak_rss_mib']:7.0f} MiB  {m['seconds']:6.1f}s"
    )


def _names(tag: str | None) -> tuple[str, Path]:
    name = "data_scale" if tag is None else f"data_scale-{tag}"
    return name, RESULTS / f"{name}-table.md"


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"ImageFolder of {doc['settings']['side']}-pixel JPEGs, {CLASSES} classes; {doc['machine']['cpu']}, "
        f"torch {doc['machine']['torch']}, {doc['settings']['threads']} threads",
        "",
        "| N | cache file MiB | command | peak RssAnon MiB | peak RssFile MiB | peak RSS MiB | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        for name, m in row["commands"].items():
            lines.append(
                f"| {row['n']} | {row['cache_file_mib']:.0f} | {name} | {m['peak_anon_mib']:.0f} | "
                f"{m['peak_file_mib']:.0f} | {m['peak_rss_mib']:.0f} | {m['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000,20000")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--commands",
        default="poison,scan,unlearn",
        help="measure only these commands or rows ('poison,unlearn tar-ewc'; rows merge by N)",
    )
    parser.add_argument("--table", action="store_true", help="only print the stored table")
    parser.add_argument("--tag", help="store as data_scale-TAG.json (another machine's rows)")
    args = parser.parse_args()
    name, table_path = _names(args.tag)
    if args.table:
        print(table(json.loads((RESULTS / f"{name}.json").read_text())))
        return
    if not Path("/proc/self/status").is_file():
        raise SystemExit("data_scale measures memory through /proc: Linux only")
    torch.set_num_threads(args.threads)
    settings = {"side": args.side, "threads": args.threads}
    doc = {"benchmark": "data_scale", "settings": settings, "machine": machine(), "rows": []}
    path = RESULTS / f"{name}.json"
    if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
        doc["rows"] = json.loads(path.read_text())["rows"]
    commands = set(args.commands.split(","))
    for n in (int(s) for s in args.sizes.split(",")):
        row = run_size(n, args.side, args.threads, commands)
        old = next((r for r in doc["rows"] if r["n"] == n), None)
        if old is not None:  # this run's commands replace the stored ones; the others stay
            row = {
                **old,
                **{k: v for k, v in row.items() if k != "commands"},
                "commands": {**old["commands"], **row["commands"]},
            }
        doc["rows"] = sorted([r for r in doc["rows"] if r["n"] != n] + [row], key=lambda r: r["n"])
    write_results(name, doc)
    table_path.write_text(table(doc))
    print(table(doc))


if __name__ == "__main__":
    main()
