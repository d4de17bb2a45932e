"""`cleanse train`: train a classifier (optionally on poisoned data) and evaluate CA/ASR/RA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cleanse.cli.common import NoCacheOpt, PrecisionOpt, SplitOpt, say
from cleanse.cli.options import Common, ModelFlags, with_options
from cleanse.cli.render import metrics_table, run_job, show, view
from cleanse.jobs import TrainOptions, TrainResult, train

MODEL_PANEL = "Model (a fresh model, or a raw --init file)"


DataArg = Annotated[
    str,
    typer.Argument(help="Training DATA (a poisoned dataset from `cleanse poison`, a folder, .npz or 'synthetic')."),
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Model checkpoint .safetensors to write.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training data.")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", help="Default: 512 for 20,000+ images, else 256.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default depends on the architecture).")]
OptimizerOpt = Annotated[
    str | None,
    typer.Option(
        "--optimizer",
        help="sgd | adamw (default: adamw for transformer-style networks, else sgd; docs/architectures.md).",
    ),
]
TestOpt = Annotated[str | None, typer.Option("--test", help="Held-out clean DATA for CA (and ASR/RA with --trigger).")]
TriggerOpt = Annotated[Path | None, typer.Option("--trigger", help="Trigger file for ASR/RA on --test.")]
InitOpt = Annotated[
    Path | None, typer.Option("--init", help="Continue from this model's weights instead of a fresh model.")
]
CheckpointEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-every",
        metavar="N",
        help="Every N epochs save a resumable checkpoint to MODEL.resume.safetensors (removed at the end).",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the interrupted run from MODEL.resume.safetensors "
        "(same DATA and options; the result equals an uninterrupted run).",
    ),
]


@with_options(model=MODEL_PANEL)
def train_command(
    common: Common,
    model_flags: ModelFlags,
    data: DataArg,
    output: OutputOpt,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    test: TestOpt = None,
    trigger: TriggerOpt = None,
    init: InitOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    resume: ResumeOpt = False,
    precision: PrecisionOpt = "auto",
    split: SplitOpt = "train",
    no_cache: NoCacheOpt = False,
    optimizer: OptimizerOpt = None,
) -> None:
    """Train a model; evaluate CA (and ASR/RA with --trigger) on --test every epoch."""
    options = TrainOptions(
        data,
        output,
        model_flags.options(),
        epochs,
        batch_size,
        lr,
        test,
        trigger,
        init,
        checkpoint_every,
        resume,
        precision,
        split,
        no_cache,
        optimizer,
    )
    run_job(train, options, common)


@view(TrainResult)
def show_train(result: TrainResult) -> None:
    if result.test is not None:
        show(
            metrics_table(
                f"{result.arch} after {result.epochs} epochs on {result.test} ({result.test_images} images)",
                [("final", result.metrics)],
            )
        )
    say(f"wrote {result.output} ({result.wall_seconds:.0f}s)")
