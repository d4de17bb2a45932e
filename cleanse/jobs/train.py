"""The train job: train a classifier (optionally on poisoned data), evaluate CA/ASR/RA, write the checkpoint and
record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cleanse.attacks import load_trigger
from cleanse.data import Dataset, load_data
from cleanse.engine.device import resolve_precision
from cleanse.engine.distributed import current
from cleanse.engine.train import TrainConfig, TrainState, load_train_state, save_train_state, train_model
from cleanse.errors import CleanseError
from cleanse.files import check_output, output_set, write_json_atomic
from cleanse.jobs.inputs import (
    RunSettings,
    check_classes,
    check_resume_file,
    check_same_run,
    check_trainable,
    close_resume_file,
    load_clean,
    load_job_model,
    note_data,
    open_resume_file,
    resume_path,
)
from cleanse.jobs.progress import SILENT, Progress
from cleanse.models import ClassifierModel, ModelOptions, new_model, save_model
from cleanse.record import describe_input, new_record, record_path, versions
from cleanse.training_defaults import data_normalization

OPTIMIZERS = ("sgd", "adamw")
TRAIN_RUN_FACTS = (("data", "DATA"), ("init", "--init"), ("arch", "--arch"), ("arch_args", "--arch-arg"))


@dataclass
class TrainOptions:
    data: str
    output: Path
    model: ModelOptions | None = (
        None  # the architecture and preprocessing of a fresh model, or what a raw --init file lacks
    )
    epochs: int = 10
    batch_size: int | None = None  # default: 512 for 20,000+ images, else 256
    lr: float | None = None  # default depends on the architecture
    test: str | None = None
    trigger: Path | None = None
    init: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    precision: str = "auto"
    split: str = "train"
    no_cache: bool = False
    optimizer: str | None = None  # sgd | adamw; None: by architecture (engine/train.py)


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    output: Path
    arch: str
    epochs: int
    test: str | None
    test_images: int | None
    wall_seconds: float
    precision: str

    def to_json(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "model": str(self.output),
            "epochs": self.epochs,
            "wall_seconds": self.wall_seconds,
            "precision": self.precision,
        }


def _check_numbers(o: TrainOptions) -> None:
    if o.epochs < 1 or (o.batch_size is not None and o.batch_size < 1):
        raise CleanseError("--epochs and --batch-size must be at least 1")
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise CleanseError(f"--lr {o.lr} must be a positive number, e.g. 0.1")
    if o.optimizer is not None and o.optimizer not in OPTIMIZERS:
        raise CleanseError(f"--optimizer {o.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if o.checkpoint_every is not None and o.checkpoint_every < 1:
        raise CleanseError(f"--checkpoint-every {o.checkpoint_every} must be at least 1 (epochs between checkpoints)")


def train(options: TrainOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> TrainResult:
    o, s = options, settings or RunSettings()
    m = o.model or ModelOptions()
    run_path = record_path(o.output)
    inputs = (o.data, o.test, str(o.trigger) if o.trigger else None, str(o.init) if o.init else None)
    for path in (o.output, run_path):
        check_output(path, force=s.force, inputs=inputs)
    _check_numbers(o)
    state_path = resume_path(o.output)
    check_resume_file(state_path, o.checkpoint_every, o.resume, s.force)
    checkpoint_every = o.checkpoint_every
    state: TrainState | None = None
    if o.resume:
        state = load_train_state(state_path)
        if checkpoint_every is None:
            checkpoint_every = int(state.extra.get("checkpoint_every") or 0) or None
    if checkpoint_every is not None:
        check_output(state_path, force=True, inputs=inputs)
    dev = s.rank_device()
    ranks = current()
    if not ranks.main:  # one live table, one set of notes: rank 0's
        progress = SILENT
    prec = resolve_precision(o.precision, dev)
    started = time.perf_counter()
    train_data = load_data(o.data, split=o.split, cache=not o.no_cache)
    note_data(train_data, progress)
    trig = load_trigger(o.trigger) if o.trigger else None
    model, parent = _model_to_train(o, m, train_data, dev, s.seed, progress)
    check_classes(model, train_data, o.data)
    check_trainable(train_data, o.data)
    size = (model.spec.input_size[1], model.spec.input_size[2])
    if train_data.image_size != size:
        raise CleanseError(
            f"{o.data} has {train_data.image_size[0]}x{train_data.image_size[1]} images but the model takes "
            f"{size[0]}x{size[1]}; resize the data"
        )
    test_data, dropped = load_clean(o.test, "test", o.no_cache, size, model.spec.preprocess) if o.test else (None, 0)
    if test_data is not None and o.test is not None:
        check_classes(model, test_data, o.test)
        note_data(test_data, progress)
    if trig is not None:
        trig.check_size(model.spec.input_size[0], size[0], size[1], what="the model's inputs")
        if test_data is None:
            progress.note("note: --trigger without --test: ASR/RA are not measured")
    config = TrainConfig(
        epochs=o.epochs,
        batch_size=o.batch_size,
        lr=o.lr,
        optimizer=o.optimizer,
        precision=prec,
        seed=s.seed,
        init_whitening=o.init is None,
    )
    facts = {
        "data": describe_input(o.data),
        "init": describe_input(o.init),
        "arch": model.spec.arch,
        "arch_args": model.spec.arch_args,
        "checkpoint_every": checkpoint_every,
    }
    if state is not None:
        check_same_run(state.extra, facts, TRAIN_RUN_FACTS, state_path)
        progress.note(f"resuming from {state_path} after epoch {state.epoch}/{o.epochs}")

    def checkpoint(snapshot: TrainState) -> None:
        snapshot.extra = facts
        save_train_state(state_path, snapshot)

    resumable = ranks.main and open_resume_file(state_path, checkpoint_every, state is not None, progress)
    with progress.loop("train", f"train {model.spec.arch}", o.epochs) as callback:
        result = train_model(
            model,
            train_data,
            config,
            test=test_data,
            trigger=trig,
            callback=callback,
            resume=state,
            checkpoint_every=checkpoint_every or 0,
            on_checkpoint=checkpoint if ranks.main else None,
            ranks=ranks,
        )
    metrics: dict[str, Any] = dict(result["metrics"])
    wall = time.perf_counter() - started
    provenance = {
        "command": "train",
        "data": facts["data"],
        "seed": s.seed,
        "epochs": o.epochs,
        "parent_sha256": parent,
        "version": versions()["cleanse"],
    }
    if model.spec.provenance.get("source_sha256") and parent is not None:
        provenance["imported_from"] = model.spec.provenance
    record = new_record(
        "train",
        inputs={
            "data": facts["data"],
            "test": describe_input(o.test),
            "trigger": describe_input(o.trigger),
            "init": describe_input(o.init),
        },
        parameters={
            "arch": model.spec.arch,
            "arch_args": model.spec.arch_args,
            **result["config"],
            "checkpoint_every": checkpoint_every,
            "resumed_after_epoch": state.epoch if state else None,
            "ranks": ranks.world,  # torchrun processes; the batch is the global one
        },
        metrics=metrics,
        filtered={"test_rows_dropped_as_poisoned": dropped},
        history=result["history"],
        timings={"train_seconds": result["train_seconds"], "wall_seconds": wall},
        versions=versions(dev),
        outputs={"model": str(o.output)},
    )
    if ranks.main:  # the other ranks hold the same weights
        with output_set() as out:
            save_model(model, out.reserve(o.output), provenance)
            write_json_atomic(out.reserve(run_path), record)
        close_resume_file(state_path, resumable, progress)
    return TrainResult(
        metrics,
        o.output,
        model.spec.arch,
        o.epochs,
        o.test,
        len(test_data) if test_data is not None else None,
        wall,
        prec,
    )


def _model_to_train(
    o: TrainOptions, m: ModelOptions, data: Dataset, dev: torch.device, seed: int, progress: Progress
) -> tuple[ClassifierModel, str | None]:
    """The --init model (and its sha256, the parent), or a fresh one shaped by the data and the model options."""
    if o.init is not None:
        model = load_job_model(str(o.init), m, dev, progress)
        return model, model.source_sha256
    if m.input_size is not None or m.classes is not None:
        raise CleanseError(
            "--input-size and --classes describe a raw --init file; a fresh model takes them from the data"
        )
    if m.num_classes is not None and m.num_classes != data.num_classes:
        raise CleanseError(
            f"--num-classes {m.num_classes} but {o.data} has {data.num_classes} classes; drop --num-classes"
        )
    mean, std = (m.mean, m.std) if m.mean is not None else data_normalization(data)
    height, width = data.image_size
    model = new_model(
        m.arch or "cnn",
        data.num_classes,
        data.classes,
        (data.channels, height, width),
        mean,
        std,
        m.arch_args or {},
        seed=seed,
        preprocess=m.preprocess or "resize",
    ).to(dev)
    return model, None
