"""`cleanse train`: train a classifier (optionally on poisoned data) and evaluate CA/ASR/RA."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cleanse.attacks import load_trigger
from cleanse.cli.common import (SESSION, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, NoCacheOpt, PrecisionOpt, QuietOpt, SeedOpt,
                                SplitOpt, emit_json, say, start)
from cleanse.cli.model_opts import (ClassesOpt, InputSizeOpt, MeanOpt, NumClassesOpt, PresetOpt, StdOpt, load_cli_model,
                                    normalization, parse_arch_args)
from cleanse.cli.render import TRAIN_COLUMNS, Monitor, metrics_table, show
from cleanse.data import Dataset, load_data
from cleanse.engine.device import resolve_device, resolve_precision
from cleanse.engine.train import TrainConfig, TrainState, load_train_state, save_train_state, train_model
from cleanse.errors import CleanseError
from cleanse.files import check_output, output_set, write_json_atomic
from cleanse.models import ARCHITECTURES, ClassifierModel, new_model, save_model
from cleanse.record import describe_input, new_record, record_path, versions
from cleanse.training_defaults import data_normalization

ARCH_HELP = f"Architecture: {', '.join(ARCHITECTURES.names())}, torchvision:NAME, or path/file.py:factory."


def load_clean(spec: str, split: str, no_cache: bool, size: tuple[int, int] | None = None) -> tuple[Dataset, int]:
    """Load evaluation data with rows marked poisoned/noise dropped; returns (data, dropped count)."""
    data = load_data(spec, split=split, cache=not no_cache, image_size=size)
    bad = data.suspicious_mask()
    if bad.any():
        data = data.subset((~bad).nonzero().flatten())
    return data, int(bad.sum())


def check_classes(model: ClassifierModel, data: Dataset, what: str) -> None:
    """DATA fits the model: the same class count and channel count (image sizes are checked or resized by the caller)."""
    if data.num_classes != model.spec.num_classes:
        raise CleanseError(f"{what} has {data.num_classes} classes but the model has {model.spec.num_classes}; use data with the model's classes")
    if data.channels != model.spec.input_size[0]:
        raise CleanseError(f"{what} has {data.channels}-channel images but the model takes {model.spec.input_size[0]} channels; "
                           "use data with the model's channels")


def check_trainable(data: Dataset, what: str) -> None:
    """Training data needs at least two classes and at least one image of every class."""
    if data.num_classes < 2:
        raise CleanseError(f"{what} has only one class ({data.classes[0]}); a classifier needs at least 2 classes")
    counts = data.labels.bincount(minlength=data.num_classes)
    empty = [i for i, c in enumerate(counts.tolist()) if c == 0]
    if empty:
        raise CleanseError(f"{what} has no images of class {empty[0]} ({data.classes[empty[0]]})"
                           f"{f' and {len(empty) - 1} more classes' if len(empty) > 1 else ''}; add images of it or remove its class folder")


def resume_path(output: Path) -> Path:
    """Where `--checkpoint-every` keeps the resumable state of a run writing `output`."""
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{stem}.resume.safetensors")


def train_command(
    data: Annotated[str, typer.Argument(help="Training DATA (a poisoned dataset from `cleanse poison`, a folder, .npz or 'synthetic').")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model checkpoint .safetensors to write.")],
    arch: Annotated[Optional[str], typer.Option("--arch", help=ARCH_HELP + " Default: cnn.")] = None,
    arch_arg: Annotated[Optional[list[str]], typer.Option("--arch-arg", help="Architecture argument NAME=VALUE (e.g. width=32,64,64).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training data.")] = 10,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Default: 512 for 20,000+ images, else 256.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default depends on the architecture).")] = None,
    test: Annotated[Optional[str], typer.Option("--test", help="Held-out clean DATA for CA (and ASR/RA with --trigger).")] = None,
    trigger: Annotated[Optional[Path], typer.Option("--trigger", help="Trigger file for ASR/RA on --test.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Continue from this model's weights instead of a fresh model.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", metavar="N",
                                help="Every N epochs save a resumable checkpoint to MODEL.resume.safetensors (removed at the end).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run from MODEL.resume.safetensors "
                                                          "(same DATA and options; the result equals an uninterrupted run).")] = False,
    preset: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    classes: ClassesOpt = None,
    precision: PrecisionOpt = "auto",
    split: SplitOpt = "train",
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a model; evaluate CA (and ASR/RA with --trigger) on --test every epoch."""
    start(debug=debug, quiet=quiet, json_out=json_out)
    run_path = record_path(output)
    inputs = (data, test, str(trigger) if trigger else None, str(init) if init else None)
    for path in (output, run_path):
        check_output(path, force=force, inputs=inputs)
    if epochs < 1 or (batch_size is not None and batch_size < 1):
        raise CleanseError("--epochs and --batch-size must be at least 1")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise CleanseError(f"--lr {lr} must be a positive number, e.g. 0.1")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise CleanseError(f"--checkpoint-every {checkpoint_every} must be at least 1 (epochs between checkpoints)")
    state_path = resume_path(output)
    state: TrainState | None = None
    if resume:
        if not state_path.is_file():
            raise CleanseError(f"{state_path}: no checkpoint to resume from; run without --resume (with --checkpoint-every N to write one)")
        state = load_train_state(state_path)
        if checkpoint_every is None:
            checkpoint_every = int(state.extra.get("checkpoint_every") or 0) or None
    elif checkpoint_every is not None and state_path.exists() and not force:
        raise CleanseError(f"{state_path}: a checkpoint of an interrupted run exists; pass --resume to continue it, or --force to start over")
    if checkpoint_every is not None:
        check_output(state_path, force=True, inputs=inputs)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    started = time.perf_counter()
    train_data = load_data(data, split=split, cache=not no_cache)
    for note in train_data.notes:
        say(f"note: {note}")
    trig = load_trigger(trigger) if trigger else None
    if init is not None:
        model = load_cli_model(str(init), dev, arch, num_classes, input_size, preset, mean, std, classes, arch_arg)
        parent = model.source_sha256
    else:
        m, s = normalization(preset, mean, std)
        if m is None:
            m, s = data_normalization(train_data)
        if input_size is not None or classes is not None:
            raise CleanseError("--input-size and --classes describe a raw --init file; a fresh model takes them from the data")
        if num_classes is not None and num_classes != train_data.num_classes:
            raise CleanseError(f"--num-classes {num_classes} but {data} has {train_data.num_classes} classes; drop --num-classes")
        height, width = train_data.image_size
        model = new_model(arch or "cnn", train_data.num_classes, train_data.classes, (train_data.channels, height, width), m, s,
                          _arch_args(arch_arg), seed=seed).to(dev)
        parent = None
    check_classes(model, train_data, data)
    check_trainable(train_data, data)
    size = tuple(model.spec.input_size[1:])
    if train_data.image_size != size:
        raise CleanseError(f"{data} has {train_data.image_size[0]}x{train_data.image_size[1]} images but the model takes {size[0]}x{size[1]}; resize the data")
    test_data, dropped = (load_clean(test, "test", no_cache, size) if test else (None, 0))
    if test_data is not None:
        check_classes(model, test_data, test)  # type: ignore[arg-type]
        for note in test_data.notes:
            say(f"note: {note}")
    if trig is not None:
        trig.check_size(model.spec.input_size[0], size[0], size[1], what="the model's inputs")
        if test_data is None:
            say("note: --trigger without --test: ASR/RA are not measured")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, precision=prec, seed=seed, init_whitening=init is None)
    facts = {"data": describe_input(data), "init": describe_input(init), "arch": model.spec.arch, "arch_args": model.spec.arch_args,
             "checkpoint_every": checkpoint_every}
    if state is not None:
        check_same_run(state.extra, facts, TRAIN_RUN_FACTS, state_path)
        say(f"resuming from {state_path} after epoch {state.epoch}/{epochs}")

    def checkpoint(snapshot: TrainState) -> None:
        snapshot.extra = facts
        save_train_state(state_path, snapshot)

    if checkpoint_every or state is not None:
        if state is None:
            state_path.unlink(missing_ok=True)  # --force: a stale checkpoint of another run must not be offered for --resume
        SESSION.resume_file = state_path
    with Monitor(f"train {model.spec.arch}", TRAIN_COLUMNS, epochs) as monitor:
        result = train_model(model, train_data, config, test=test_data, trigger=trig, callback=monitor, resume=state,
                             checkpoint_every=checkpoint_every or 0, on_checkpoint=checkpoint)
    metrics: dict[str, Any] = dict(result["metrics"])
    wall = time.perf_counter() - started
    provenance = {"command": "train", "data": facts["data"], "seed": seed, "epochs": epochs,
                  "parent_sha256": parent, "version": versions()["cleanse"]}
    if model.spec.provenance.get("source_sha256") and parent is not None:
        provenance["imported_from"] = model.spec.provenance
    record = new_record("train", inputs={"data": facts["data"], "test": describe_input(test), "trigger": describe_input(trigger),
                                         "init": describe_input(init)},
                        parameters={"arch": model.spec.arch, "arch_args": model.spec.arch_args, **result["config"],
                                    "checkpoint_every": checkpoint_every, "resumed_after_epoch": state.epoch if state else None},
                        metrics=metrics, filtered={"test_rows_dropped_as_poisoned": dropped}, history=result["history"],
                        timings={"train_seconds": result["train_seconds"], "wall_seconds": wall},
                        versions=versions(dev), outputs={"model": str(output)})
    with output_set() as out:
        save_model(model, out.reserve(output), provenance)
        write_json_atomic(out.reserve(run_path), record)
    if checkpoint_every or state is not None:
        SESSION.resume_file = None
        state_path.unlink(missing_ok=True)  # the run is complete: its checkpoint is no longer needed
    if test_data is not None:
        show(metrics_table(f"{model.spec.arch} after {epochs} epochs on {test} ({len(test_data)} images)", [("final", metrics)]))
    say(f"wrote {output} ({wall:.0f}s)")
    if json_out:
        emit_json({**metrics, "model": str(output), "epochs": epochs, "wall_seconds": wall, "precision": prec})


TRAIN_RUN_FACTS = (("data", "DATA"), ("init", "--init"), ("arch", "--arch"), ("arch_args", "--arch-arg"))


def check_same_run(saved: dict[str, Any], facts: dict[str, Any], flags: tuple[tuple[str, str], ...], path: Path) -> None:
    """The checkpoint belongs to this command line: the same inputs (by sha256) and options, named by `flags`."""
    for key, flag in flags:
        if saved.get(key) != facts[key]:
            raise CleanseError(f"{path}: the checkpoint was written for another {flag} ({_describe(saved.get(key))} vs "
                               f"{_describe(facts[key])}); rerun with the interrupted run's options, or without --resume")


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "path" in value:
        return str(value["path"]) + (f" sha256 {value['sha256'][:12]}" if value.get("sha256") else "")
    return str(value)


def _arch_args(items: list[str] | None) -> dict[str, Any]:
    return parse_arch_args(items)
