"""unlearn's batches in pieces: the time of one training step against the rows per forward, side by side in one run.

    python -m benchmarks.unlearn_pieces [--threads 2] [--repeats 3] [--steps 3] [--table]

A recipe that steps through `RecipeRun.step_pieces` cuts its batch into forwards of at most the memory plan's rows
(on a CPU, 256 MiB of saved tensors: cleanse/engine/memory.py) and adds the pieces' gradients. This times
`RecipeRun.backward_pieces` plus the SGD step (a finetune step: cross-entropy, train mode) on one fixed batch, for each
piece size in turn, interleaved in every repeat, and reports the median milliseconds per image (forward, backward
and step, divided by the batch's rows) and the saved activations per forward (the plan's measured bytes per image x
rows). Models, all untrained (speed does not depend on the weights):

- `cnn-224`: a `cnn` of widths 8,16,16 at 224x224 (benchmarks/data_scale.py's model), batch 128: the cap cuts it
  into pieces of 13;
- `resnet18-32`: torchvision's ResNet-18 at 32x32, batch 128: pieces of 56;
- `cnn-32`: the default `cnn` (64,256,256) at 32x32, batch 128: not cut (156 rows fit), timed cut for comparison.

The gradients of every piece size are checked against the whole batch's with the model in eval mode (where pieces
are exact); the timings run in train mode, as finetune does. Writes results/unlearn_pieces.json and
unlearn_pieces-table.md. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine, write_results
from benchmarks.data_scale import tiny_model
from cleanse.engine.memory import MemoryPlan, plan_memory
from cleanse.models import ClassifierModel, load_model, new_model
from cleanse.recipes.base import HeldMonitor, LatestKeeper, RecipeContext, RecipeRun

MIB = 2**20
BATCH = 128
# model name -> (side, rows per forward tried); None is the plan's own pick, BATCH the whole batch (as before)
CASES: dict[str, tuple[int, tuple[int | None, ...]]] = {
    "cnn-224": (224, (8, None, 32, 64, BATCH)),
    "resnet18-32": (32, (16, 32, None, BATCH)),
    "cnn-32": (32, (32, 64, BATCH)),
}


def _model(name: str) -> ClassifierModel:
    if name == "cnn-224":
        return load_model(tiny_model(224))
    names = [str(c) for c in range(10)]
    arch, args = ("resnet18", {}) if name == "resnet18-32" else ("cnn", {"width": "64,256,256"})
    return new_model(arch, 10, names, (3, 32, 32), [0.5] * 3, [0.25] * 3, args, seed=0)


def _run(model: ClassifierModel, rows: int) -> RecipeRun:
    """A RecipeRun whose forwards hold `rows` images: only its stepping is used."""
    plan = MemoryPlan(budget=rows, source="benchmark", saved_per_image=1, image_bytes=0)
    ctx = RecipeContext(model, None, None, {}, callback=lambda e: None, memory=plan)
    return RecipeRun("finetune", ctx, HeldMonitor(None, None, None), {}, LatestKeeper(model, {}))


def _losses(model: ClassifierModel):
    return lambda x, y, _: (F.cross_entropy(model(x).float(), y),)


def _gradients(model: ClassifierModel, rows: int, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.0)
    _run(model, rows).backward_pieces(optimizer, x, y, torch.arange(len(x)), _losses(model))
    return [p.grad.clone() for p in model.net.parameters() if p.grad is not None]


def _timed(model: ClassifierModel, rows: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds per step (pieces' forwards and backwards, then the SGD step), after one warm-up step."""
    model.train()
    run = _run(model, rows)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=1e-4, momentum=0.9)
    idx = torch.arange(len(x))
    run.step_pieces(optimizer, x, y, idx, _losses(model))
    started = time.perf_counter()
    for _ in range(steps):
        run.step_pieces(optimizer, x, y, idx, _losses(model))
    return (time.perf_counter() - started) / steps


def measure(name: str, steps: int, repeats: int) -> list[dict[str, Any]]:
    side, tried = CASES[name]
    model = _model(name)
    plan = plan_memory(model.net, (3, side, side), "fp32", training=True)
    picks = [plan.rows_per_forward() if r is None else r for r in tried]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((BATCH, 3, side, side), generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    whole = _gradients(model, BATCH, x, y)
    worst = {
        r: max(float((a - b).abs().max()) for a, b in zip(_gradients(model, r, x, y), whole, strict=True))
        for r in picks
    }
    seconds: dict[int, list[float]] = {r: [] for r in picks}
    for _ in range(repeats):
        for r in picks:
            seconds[r].append(_timed(model, r, x, y, steps))
    base = statistics.median(seconds[BATCH])
    rows = []
    for r, chosen in zip(picks, tried, strict=True):
        per_step = statistics.median(seconds[r])
        rows.append(
            {
                "model": name,
                "side": side,
                "rows_per_forward": r,
                "pieces": -(-BATCH // r),
                "plan_pick": chosen is None,
                "saved_mib_per_forward": plan.saved_per_image * min(r, BATCH) / MIB,
                "ms_per_image": 1000 * per_step / BATCH,
                "speed_vs_whole": base / per_step,
                "max_grad_difference": worst[r],
                "seconds": seconds[r],
            }
        )
        print(
            f"{name:12} rows {r:>4} ({rows[-1]['pieces']:>2} pieces){' plan' if chosen is None else '     '}  "
            f"{rows[-1]['ms_per_image']:7.2f} ms/image  x{rows[-1]['speed_vs_whole']:.2f}  "
            f"grad diff {worst[r]:.1e}",
            flush=True,
        )
    return rows


def table(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        f"Training steps in pieces, batch {BATCH}; {doc['machine']['cpu']}, torch {doc['machine']['torch']}, fp32, "
        f"{s['threads']} threads, {s['steps']} steps x {s['repeats']} interleaved repeats (median)",
        "",
        "| model | rows per forward (pieces) | saved MiB per forward | ms per image | vs whole batch | max grad diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        pick = ", the plan's pick" if r["plan_pick"] else (", whole batch" if r["pieces"] == 1 else "")
        lines.append(
            f"| {r['model']} | {r['rows_per_forward']} ({r['pieces']}{pick}) | {r['saved_mib_per_forward']:.0f} | "
            f"{r['ms_per_image']:.2f} | {r['speed_vs_whole']:.2f}x | {r['max_grad_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="only print the stored table")
    args = parser.parse_args()
    path = RESULTS / "unlearn_pieces.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    settings = {"threads": args.threads, "steps": args.steps, "repeats": args.repeats}
    doc = {"benchmark": "unlearn_pieces", "settings": settings, "machine": machine(), "rows": []}
    if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
        doc["rows"] = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in names]
    for name in names:
        doc["rows"] += measure(name, args.steps, args.repeats)
    write_results("unlearn_pieces", doc)
    (RESULTS / "unlearn_pieces-table.md").write_text(table(doc))
    print(table(doc))


if __name__ == "__main__":
    main()
