"""`cleanse poison`: write a poisoned dataset and its trigger file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cleanse.attacks import ATTACKS
from cleanse.cli.common import NoCacheOpt, ParamOpt, SplitOpt, parse_params, say
from cleanse.cli.options import Common, with_options
from cleanse.cli.render import run_job, view
from cleanse.jobs import PoisonOptions, PoisonResult, poison

ATTACK_HELP = "Attack: " + "; ".join(f"{name} ({ATTACKS.get(name).summary})" for name in ATTACKS.names())


@with_options()
def poison_command(
    common: Common,
    source: Annotated[
        str,
        typer.Argument(help="Clean DATA: ImageFolder, CIFAR batch folder, .npz, dataset .safetensors, or 'synthetic'."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Poisoned dataset .safetensors to write.")],
    attack: Annotated[str, typer.Option("--attack", help=ATTACK_HELP)] = "badnets",
    target: Annotated[
        str, typer.Option("--target", help="Target class index, or 'all' for all-to-all (y -> y+1 mod C).")
    ] = "0",
    rate: Annotated[float, typer.Option("--rate", help="Poisoned fraction of the whole dataset.")] = 0.1,
    trigger_out: Annotated[
        Path | None, typer.Option("--trigger-out", help="Trigger file (default: <output stem>.trigger.safetensors).")
    ] = None,
    preview: Annotated[
        Path | None, typer.Option("--preview", help="Write a PNG grid of clean and poisoned samples.")
    ] = None,
    param: ParamOpt = None,
    split: SplitOpt = "train",
    no_cache: NoCacheOpt = False,
) -> None:
    """Poison a clean dataset with a backdoor trigger (writes the dataset, the trigger and a run record)."""
    options = PoisonOptions(
        source, output, attack, target, rate, trigger_out, preview, parse_params(param), split, no_cache
    )
    run_job(poison, options, common)


@view(PoisonResult)
def show_poison(result: PoisonResult) -> None:
    s, counts = result.summary, result.counts
    say(
        f"poisoned {counts['poisoned']} of {counts['rows']} rows with {s['attack']} (target {result.target})"
        + (f", {counts['noise']} noise rows" if counts["noise"] else "")
        + f" -> {s['output']}, trigger {s['trigger']}"
    )
