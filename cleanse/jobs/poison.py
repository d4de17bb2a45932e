"""The poison job: write a poisoned dataset, its trigger file, an optional preview and a run record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cleanse.attacks.poison import plan_poison, save_poisoned
from cleanse.data import Dataset, load_data
from cleanse.errors import CleanseError
from cleanse.files import check_output, output_set, write_json_atomic
from cleanse.jobs.inputs import RunSettings, note_data
from cleanse.jobs.progress import SILENT, Progress
from cleanse.record import describe_input, new_record, record_path, versions
from cleanse.viz import image_grid, save_png


@dataclass
class PoisonOptions:
    source: str  # clean DATA
    output: Path
    attack: str = "badnets"
    target: str | int = "0"  # a class index, or "all" for all-to-all
    rate: float = 0.1
    trigger_out: Path | None = None  # default <output stem>.trigger.safetensors
    preview: Path | None = None
    params: dict[str, str] = field(default_factory=dict)  # the attack's --param NAME=VALUE
    split: str = "train"
    no_cache: bool = False


@dataclass
class PoisonResult:
    summary: dict[str, Any]  # what --json prints
    counts: dict[str, int]
    target: str  # the trigger's target, described for people

    def to_json(self) -> dict[str, Any]:
        return self.summary


def default_trigger_path(output: Path) -> Path:
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.stem
    return output.with_name(f"{stem}.trigger.safetensors")


def poison(options: PoisonOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> PoisonResult:
    o, s = options, settings or RunSettings()
    trigger_path = o.trigger_out or default_trigger_path(o.output)
    run_path = record_path(o.output)
    outputs = [o.output, trigger_path, run_path, *((o.preview,) if o.preview else ())]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise CleanseError("-o, --trigger-out and --preview must name different files")
    for path in outputs:
        check_output(path, force=s.force, inputs=(o.source,))
    started = time.perf_counter()
    data = load_data(o.source, split=o.split, cache=not o.no_cache)
    note_data(data, progress)
    # planned, then streamed to disk a block at a time: the edited rows are never all in memory
    plan = plan_poison(data, o.attack, o.target, o.rate, seed=s.seed, params=o.params)
    trigger = plan.trigger
    counts = {"rows": len(data), "poisoned": len(plan.chosen), "noise": len(plan.picked)}
    summary = {
        "output": str(o.output),
        "trigger": str(trigger_path),
        "attack": o.attack,
        "target": trigger.target,
        "rate": o.rate,
        "seed": s.seed,
        **counts,
        "params": trigger.params,
    }
    record = new_record(
        "poison",
        inputs={"data": describe_input(o.source)},
        parameters={
            "attack": o.attack,
            "target": trigger.target,
            "rate": o.rate,
            "seed": s.seed,
            "params": trigger.params,
            "split": o.split,
        },
        outputs={"dataset": str(o.output), "trigger": str(trigger_path)},
        counts=counts,
        timings={"wall_seconds": time.perf_counter() - started},
        versions=versions(),
    )
    with output_set() as out:
        save_poisoned(plan, out.reserve(o.output))
        trigger.save(out.reserve(trigger_path))
        if o.preview:
            idx = plan.chosen[:8]
            sheet = image_grid(
                [data.images[idx], trigger.apply_uint8(data.images[idx])],
                col_labels=[_preview_heading(int(i), data, plan.labels) for i in idx],
                row_labels=["original", "poisoned"],
                title=f"{o.attack}, target {trigger.describe_target()}: the first {len(idx)} of {counts['poisoned']} "
                "poisoned rows, before and after",
            )
            save_png(sheet, out.reserve(o.preview))
        write_json_atomic(out.reserve(run_path), record)
    return PoisonResult(summary, counts, trigger.describe_target())


def _preview_heading(row: int, data: Dataset, labels: torch.Tensor) -> str:
    """A preview column's heading: the row's index and its label, with the new label where poisoning changed it."""
    before, after = data.classes[int(data.labels[row])], data.classes[int(labels[row])]
    return f"row {row}\n{before}" if before == after else f"row {row}\n{before} -> {after}"
