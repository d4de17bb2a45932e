"""How many images one forward of the scan's reversal should hold on a CPU: the time of one image-step against the
classes per forward, side by side in one run, on the same classes, steps and seed.

    python -m benchmarks.scan_forward_size [--threads 2] [--repeats 3] [--table]

The reversal stacks the classes still optimising into forwards of at most `chunk` classes x 32 images (the memory
plan decides `chunk`, cleanse/engine/memory.py). The classes are independent and the model is frozen in eval mode,
so the chunk changes only how the work is cut, never its result (equal up to float rounding: checked here on every
run). On a CPU, a forward of hundreds of images streams every activation map through memory, while a forward of a
few dozen keeps each layer's maps in the caches; this measures what that costs. Three models:

- `many-100`: the 100-class 64x64 `cnn` (widths 32,64,128) of benchmarks/scan_many_classes.py, trained and cached;
- `cnn-32`: the default `cnn` (64,256,256) at 32x32, 10 classes, untrained (speed does not depend on the weights);
- `cnn-224`: a `cnn` of widths 8,16,16 at 224x224, 10 classes, untrained (benchmarks/data_scale.py's model).

For each, `reverse_triggers` (patch family, `--steps` steps of 32 images, no early stopping) runs over the same
classes with each chunk (and, at 224 px, with one class's batch cut into slices), interleaved in every repeat; the
table gives the median milliseconds per image-step (one image through a forward and a backward) and each chunk's
saved activations per forward (the memory plan's measured bytes per image x images per forward). `--models` picks
some; their rows replace those stored. Writes results/scan_forward_size.json and
scan_forward_size-table.md. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, write_results
from benchmarks.data_scale import tiny_model
from benchmarks.scan_many_classes import clean_set, trained
from cleanse.data.synthetic import make_many_classes
from cleanse.engine.memory import plan_memory
from cleanse.models import load_model, new_model
from cleanse.scan.reverse import Budget, reverse_triggers

MIB = 2**20
# model name -> (side, classes reversed, (classes per forward, one class's images per forward) tried); the last is
# the old default, every class's whole batch in one forward
CASES: dict[str, tuple[int, int, tuple[tuple[int, int], ...]]] = {
    "many-100": (64, 10, ((1, 32), (2, 32), (5, 32), (10, 32))),
    "cnn-32": (32, 10, ((1, 32), (2, 32), (4, 32), (5, 32), (10, 32))),
    "cnn-224": (224, 4, ((1, 8), (1, 16), (1, 32), (2, 32), (4, 32))),
}


def _model(name: str) -> torch.nn.Module:
    if name == "many-100":
        return load_model(trained(100, 100, 8)["model"])
    if name == "cnn-224":
        return load_model(tiny_model(224))
    names = [str(c) for c in range(10)]
    return new_model("cnn", 10, names, (3, 32, 32), [0.5] * 3, [0.25] * 3, {"width": "64,256,256"}, seed=0)


def _images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "many-100":
        data = clean_set(100)
    else:
        data = make_many_classes(10, 200, CASES[name][0], seed=2)
    return data.images, data.labels


def measure(name: str, steps: int, repeats: int) -> dict[str, Any]:
    side, classes, chunks = CASES[name]
    model = _model(name).eval()
    images, labels = _images(name)
    budget = Budget(steps=steps, batch=32, round_steps=5, patience=2)
    per_image = plan_memory(model, (3, side, side), "fp32").per_image
    seconds: dict[tuple[int, int], list[float]] = {c: [] for c in chunks}
    results: dict[tuple[int, int], torch.Tensor] = {}
    for _ in range(repeats):
        for chunk, piece in chunks:
            began = time.perf_counter()
            rev = reverse_triggers(
                model, images, labels, range(classes), budget, seed=0, chunk=chunk, images_per_forward=piece
            )
            seconds[chunk, piece].append(time.perf_counter() - began)
            results[chunk, piece] = rev.masks
    whole = chunks[-1]
    image_steps = classes * steps * budget.batch
    rows = []
    for chunk, piece in chunks:
        ms = statistics.median(seconds[chunk, piece]) * 1000 / image_steps
        images_per_forward = chunk * piece
        rows.append(
            {
                "chunk_classes": chunk,
                "class_images_per_forward": piece,
                "images_per_forward": images_per_forward,
                "saved_mib_per_forward": images_per_forward * per_image / MIB,
                "ms_per_image_step": ms,
                "seconds": seconds[chunk, piece],
                "max_mask_difference": float((results[chunk, piece] - results[whole]).abs().max()),
            }
        )
    base = rows[-1]["ms_per_image_step"]
    for row in rows:
        row["speed_vs_whole"] = base / row["ms_per_image_step"]
    return {"model": name, "side": side, "classes": classes, "steps": steps, "per_image_bytes": per_image, "rows": rows}


def _classes(row: dict[str, Any]) -> str:
    piece = row.get("class_images_per_forward", 32)
    return str(row["chunk_classes"]) if piece == 32 else f"{row['chunk_classes']}, in slices of {piece}"


def table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, fp32, {doc['repeats']} repeats (median)",
        "",
        "| model | classes per forward | images per forward | saved MiB per forward | ms per image-step | "
        "speed vs all classes in one forward | largest mask difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in doc["cases"]:
        for r in case["rows"]:
            lines.append(
                f"| {case['model']} ({case['side']} px) | {_classes(r)} | {r['images_per_forward']} | "
                f"{r['saved_mib_per_forward']:.0f} | {r['ms_per_image_step']:.2f} | {r['speed_vs_whole']:.2f}x | "
                f"{r['max_mask_difference']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--table", action="store_true", help="rebuild the table from the stored JSON")
    args = parser.parse_args()
    path = RESULTS / "scan_forward_size.json"
    if args.table:
        print(table(json.loads(path.read_text())), end="")
        return
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    stored = json.loads(path.read_text())["cases"] if path.is_file() else []
    cases = [c for c in stored if c["model"] not in names]  # a model measured again replaces its rows
    for name in names:
        cases.append(measure(name, args.steps, args.repeats))
        print(table({"machine": machine(), "repeats": args.repeats, "cases": cases[-1:]}), flush=True)
    cases.sort(key=lambda c: list(CASES).index(c["model"]))
    doc = {"machine": machine(), "repeats": args.repeats, "steps": args.steps, "cases": cases}
    write_results("scan_forward_size", doc)
    (RESULTS / "scan_forward_size-table.md").write_text(table(doc))
    print(table(doc), end="")


if __name__ == "__main__":
    main()
