"""`cleanse poison`: write a poisoned dataset and its trigger file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cleanse.attacks import ATTACKS, poison_dataset
from cleanse.cli.common import (DebugOpt, DeviceOpt, ForceOpt, JsonOpt, NoCacheOpt, ParamOpt, QuietOpt, SeedOpt, SplitOpt,
                                emit_json, parse_params, say, start)
from cleanse.data import load_data, save_dataset
from cleanse.errors import CleanseError
from cleanse.files import check_output, output_set, write_json_atomic
from cleanse.record import describe_input, new_record, record_path, versions
from cleanse.viz import image_grid, save_png

ATTACK_HELP = "Attack: " + "; ".join(f"{name} ({ATTACKS.get(name).summary})" for name in ATTACKS.names())


def default_trigger_path(output: Path) -> Path:
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.stem
    return output.with_name(f"{stem}.trigger.safetensors")


def poison_command(
    source: Annotated[str, typer.Argument(help="Clean DATA: ImageFolder, CIFAR batch folder, .npz, dataset .safetensors, or 'synthetic'.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Poisoned dataset .safetensors to write.")],
    attack: Annotated[str, typer.Option("--attack", help=ATTACK_HELP)] = "badnets",
    target: Annotated[str, typer.Option("--target", help="Target class index, or 'all' for all-to-all (y -> y+1 mod C).")] = "0",
    rate: Annotated[float, typer.Option("--rate", help="Poisoned fraction of the whole dataset.")] = 0.1,
    trigger_out: Annotated[Optional[Path], typer.Option("--trigger-out", help="Trigger file (default: <output stem>.trigger.safetensors).")] = None,
    preview: Annotated[Optional[Path], typer.Option("--preview", help="Write a PNG grid of clean and poisoned samples.")] = None,
    param: ParamOpt = None,
    split: SplitOpt = "train",
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Poison a clean dataset with a backdoor trigger (writes the dataset, the trigger and a run record)."""
    start(debug=debug, quiet=quiet, json_out=json_out)
    trigger_path = trigger_out or default_trigger_path(output)
    run_path = record_path(output)
    paths = [p.resolve() for p in (output, trigger_path, run_path, *((preview,) if preview else ()))]
    if len(set(paths)) != len(paths):
        raise CleanseError("-o, --trigger-out and --preview must name different files")
    inputs = (source,)
    for path in (output, trigger_path, run_path, *((preview,) if preview else ())):
        check_output(path, force=force, inputs=inputs)
    started = time.perf_counter()
    data = load_data(source, split=split, cache=not no_cache)
    for note in data.notes:
        say(f"note: {note}")
    poisoned, trigger = poison_dataset(data, attack, target, rate, seed=seed, params=parse_params(param))
    counts = {"rows": len(poisoned), "poisoned": int(poisoned.poisoned.sum()),  # type: ignore[union-attr]
              "noise": int(poisoned.noise.sum()) if poisoned.noise is not None else 0}
    summary = {"output": str(output), "trigger": str(trigger_path), "attack": attack, "target": trigger.target,
               "rate": rate, "seed": seed, **counts, "params": trigger.params}
    record = new_record("poison", inputs={"data": describe_input(source)}, parameters={"attack": attack, "target": trigger.target,
                        "rate": rate, "seed": seed, "params": trigger.params, "split": split},
                        outputs={"dataset": str(output), "trigger": str(trigger_path)}, counts=counts,
                        timings={"wall_seconds": time.perf_counter() - started}, versions=versions())
    with output_set() as out:
        save_dataset(poisoned, out.reserve(output))
        trigger.save(out.reserve(trigger_path))
        if preview:
            idx = poisoned.poisoned.nonzero().flatten()[:8]  # type: ignore[union-attr]
            save_png(image_grid([data.images[idx], poisoned.images[idx]]), out.reserve(preview))
        write_json_atomic(out.reserve(run_path), record)
    say(f"poisoned {counts['poisoned']} of {counts['rows']} rows with {attack} (target {trigger.describe_target()})"
        + (f", {counts['noise']} noise rows" if counts["noise"] else "") + f" -> {output}, trigger {trigger_path}")
    if json_out:
        emit_json(summary)
