"""`cleanse demo`: the main job on built-in data: poison -> train -> evaluate CA and ASR."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cleanse.attacks import poison_dataset
from cleanse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, emit_json, say, start
from cleanse.cli.render import TRAIN_COLUMNS, Monitor, metrics_table, show
from cleanse.data import make_synthetic, save_dataset
from cleanse.engine.device import resolve_device, resolve_precision
from cleanse.engine.evaluate import evaluate
from cleanse.engine.train import TrainConfig, train_model
from cleanse.files import atomic_directory, write_json_atomic
from cleanse.models import new_model, save_model
from cleanse.record import new_record, versions
from cleanse.training_defaults import data_normalization

QUICK = {"epochs": 6, "width": "32,64,64"}


def demo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's files.")] = Path("cleanse-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller model and fewer epochs (seconds; used by the tests).")] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (default 8, 6 with --quick).")] = 0,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Poison the built-in synthetic set with BadNets, train the default cnn, and report CA and ASR."""
    start(debug=debug, quiet=quiet, json_out=json_out)
    started = time.perf_counter()
    dev = resolve_device(device)
    with atomic_directory(output, force=force) as folder:
        train = make_synthetic("train")
        test = make_synthetic("test")
        say(f"1/3 poison: BadNets 3x3 white patch, target 0 ({train.classes[0]}), 10% of {len(train)} synthetic images")
        poisoned, trigger = poison_dataset(train, "badnets", 0, 0.1, seed=seed)
        save_dataset(poisoned, folder / "poisoned.safetensors")
        trigger.save(folder / "poisoned.trigger.safetensors")
        n_epochs = epochs or (int(QUICK["epochs"]) if quick else 8)
        arch_args = {"width": QUICK["width"]} if quick else {}
        say(f"2/3 train: cnn{' (quick width ' + QUICK['width'] + ')' if quick else ''}, {n_epochs} epochs")
        mean, std = data_normalization(poisoned)
        model = new_model("cnn", 10, poisoned.classes, (3, 32, 32), mean, std, arch_args, seed=seed).to(dev)
        config = TrainConfig(epochs=n_epochs, precision=resolve_precision("auto", dev), seed=seed)
        with Monitor("train cnn", TRAIN_COLUMNS, n_epochs) as monitor:
            result = train_model(model, poisoned, config, test=test, trigger=trigger, callback=monitor)
        say(f"3/3 evaluate on synthetic:test ({len(test)} images)")
        metrics: dict[str, Any] = evaluate(model, test, trigger)
        save_model(model, folder / "model.safetensors", {"command": "demo", "seed": seed, "epochs": n_epochs})
        record = new_record("demo", parameters={"attack": "badnets", "target": 0, "rate": 0.1, "quick": quick, **result["config"]},
                            metrics=metrics, history=result["history"], versions=versions(dev),
                            timings={"train_seconds": result["train_seconds"], "wall_seconds": time.perf_counter() - started})
        write_json_atomic(folder / "run.json", record)
    show(metrics_table("backdoored model on synthetic:test", [("cnn", metrics)]))
    say(f"files in {output}/: poisoned.safetensors, poisoned.trigger.safetensors, model.safetensors, run.json "
        f"({time.perf_counter() - started:.0f}s)")
    if json_out:
        emit_json({**{k: metrics[k] for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")},
                   "output": str(output), "wall_seconds": time.perf_counter() - started})
