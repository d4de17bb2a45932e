"""`cleanse unlearn`: remove a backdoor with a small clean sample, showing CA, ASR and TAR live."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cleanse.cli.common import NoCacheOpt, ParamOpt, PrecisionOpt, fmt_rate, parse_params, say
from cleanse.cli.options import MODEL_FILE_PANEL, Common, ModelFlags, with_options
from cleanse.cli.render import LOOP_VIEWS, Column, float_cell, rate_cell, run_job, seconds_cell, show, view
from cleanse.engine.measure import class_changes
from cleanse.jobs import RecipeOutcome, UnlearnOptions, UnlearnResult, unlearn
from cleanse.recipes import RECIPES

METHOD_HELP = (
    "Recipe: "
    + "; ".join(f"{n} ({RECIPES.get(n).summary})" for n in RECIPES.names())
    + "; all (every recipe on the same clean subset, one checkpoint each, one comparison table), or a "
    + "comma-separated list of recipes compared the same way (e.g. finetune,tar-ewc)"
)
UNLEARN_COLUMNS: list[Column] = [
    ("phase", "phase", str),
    ("epoch", "epoch", float_cell),
    ("loss", "loss", float_cell),
    ("clean_ce", "clean CE", float_cell),
    ("ascent", "ascent", float_cell),
    ("ewc", "EWC", float_cell),
    ("clean_accuracy", "held CA", rate_cell),
    ("attack_success_rate", "held ASR", rate_cell),
    ("tar", "held TAR", float_cell),
    ("detail", "recipe figures", str),
    ("elapsed", "elapsed", seconds_cell),
]
LOOP_VIEWS["unlearn"] = (UNLEARN_COLUMNS, None)
SHOWN_CLASS_CHANGES = 3  # the summary names the classes whose clean accuracy changed most


ModelPathArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Model to clean (.safetensors, or a raw state dict with --arch ...).")
]
MethodOpt = Annotated[str, typer.Option("--method", help=METHOD_HELP)]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="DATA to draw the clean subset from (rows marked poisoned are dropped)."),
]
CleanFracOpt = Annotated[
    float | None, typer.Option("--clean-frac", help="Fraction of DATA's clean rows to use, e.g. 0.05.")
]
CleanNOpt = Annotated[int | None, typer.Option("--clean-n", help="Number of clean images to use in all.")]
TriggerOpt = Annotated[
    Path | None, typer.Option("--trigger", help="Trigger file (true from `poison`, or reversed by `scan`).")
]
TestOpt = Annotated[
    str | None, typer.Option("--test", help="Held-out DATA for the before/after report (never used for decisions).")
]
EvalTriggerOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--eval-trigger",
        help="Extra trigger file for reporting-only ASR/RA (repeatable), e.g. the true trigger when cleaning "
        "with a reversed one.",
    ),
]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="The recipe's main budget (see docs/recipes/).")]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help=(
            "Layer for TAR: NAME or NAME@HxW "
            "(default: the deepest block output at least input/8 on a side; docs/architectures.md)."
        ),
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Cleaned checkpoint (default <model stem>.<method>.safetensors)."),
]
CheckpointEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-every",
        metavar="N",
        help="Every N passes over the clean subset save a resumable checkpoint to "
        "OUT.resume.safetensors (removed at the end; finetune, tar-ewc, ulrl, sau).",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the interrupted run from OUT.resume.safetensors; "
        "the rest of the command line must be the interrupted run's.",
    ),
]

MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        metavar="SIZE",
        help="Memory one training forward may take, e.g. 1GiB, 512MiB or plain bytes; finetune, tar-ewc, ulrl, "
        "grad-prune and act-edit step each batch in pieces that fit, adding their gradients (default: half the "
        "device's free memory; on a CPU at most 256 MiB; docs/commands/unlearn.md).",
    ),
]


@with_options(model=MODEL_FILE_PANEL)
def unlearn_command(
    common: Common,
    model_flags: ModelFlags,
    model_path: ModelPathArg,
    method: MethodOpt = "tar-ewc",
    data: DataOpt = None,
    clean_frac: CleanFracOpt = None,
    clean_n: CleanNOpt = None,
    trigger: TriggerOpt = None,
    test: TestOpt = None,
    eval_trigger: EvalTriggerOpt = None,
    epochs: EpochsOpt = None,
    param: ParamOpt = None,
    layer: LayerOpt = None,
    output: OutputOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    resume: ResumeOpt = False,
    precision: PrecisionOpt = "auto",
    no_cache: NoCacheOpt = False,
    memory_budget: MemoryBudgetOpt = None,
) -> None:
    """Remove a backdoor with a small clean subset; exit 0 when it finishes, whatever the outcome (see the JSON).

    --method all runs every recipe on the same clean subset, writes OUT.<method>.safetensors for each and prints one
    comparison table ({"recipes": {name: summary}} with --json); --method A,B does the same for the recipes named.
    """
    options = UnlearnOptions(
        model_path,
        data,
        method,
        model_flags.options(),
        clean_frac,
        clean_n,
        trigger,
        test,
        list(eval_trigger or []),
        epochs,
        parse_params(param),
        layer,
        output,
        checkpoint_every,
        resume,
        precision,
        no_cache,
        memory_budget,
    )
    run_job(unlearn, options, common)


@view(UnlearnResult)
def show_unlearn(result: UnlearnResult) -> None:
    wall = result.wall_seconds
    if result.several:
        _show_comparison(result.summaries, result.before, result.measured_on)
        say(
            f"wrote {len(result.summaries)} checkpoints "
            f"({', '.join(str(result.outputs[n]) for n in result.summaries)}) "
            f"in {wall:.0f}s"
        )
    else:
        say(f"wrote {next(iter(result.outputs.values()))} ({wall:.0f}s)")


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _show_comparison(summaries: dict[str, dict[str, Any]], before: dict[str, Any], measured_on: str) -> None:
    table = Table(title=f"recipes compared on the same clean subset, on {measured_on}", title_justify="left")
    for header in ("recipe", "CA", "ASR", "RA", "TAR", "DER", "wall"):
        table.add_column(header, justify="left" if header == "recipe" else "right")
    table.add_row(
        "(before)",
        fmt_rate(before["clean_accuracy"]),
        fmt_rate(before["attack_success_rate"]),
        fmt_rate(before["robust_accuracy"]),
        _num(before["tar"]),
        "",
        "",
    )
    for name, s in summaries.items():
        a = s["after"]
        table.add_row(
            name,
            fmt_rate(a["clean_accuracy"]),
            fmt_rate(a["attack_success_rate"]),
            fmt_rate(a["robust_accuracy"]),
            _num(a["tar"]),
            _num(s["der"]),
            f"{s['wall_seconds']:.0f}s",
        )
    show(table)


@view(RecipeOutcome)
def show_recipe(outcome: RecipeOutcome) -> None:
    """One recipe's before -> after table, the state it kept, and a warning when it kept none of its own."""
    s = outcome.summary
    table = Table(title=f"{s['method']}: before -> after, on {s['measured_on']}", title_justify="left")
    for header in ("", "CA", "ASR", "RA", "TAR", "clean TAR"):
        table.add_column(header, justify="right" if header else "left")
    for name in ("before", "after"):
        m = s[name]
        table.add_row(
            name,
            fmt_rate(m["clean_accuracy"]),
            fmt_rate(m["attack_success_rate"]),
            fmt_rate(m["robust_accuracy"]),
            _num(m["tar"]),
            _num(m["clean_tar"]),
        )
    show(table)
    for name in s["before"].get("eval_triggers", {}):
        b, a = s["before"]["eval_triggers"][name], s["after"]["eval_triggers"][name]
        say(
            f"--eval-trigger {name}: ASR {fmt_rate(b['attack_success_rate'])} -> {fmt_rate(a['attack_success_rate'])}, "
            f"RA {fmt_rate(b['robust_accuracy'])} -> {fmt_rate(a['robust_accuracy'])}"
        )
    say(f"DER {_num(s['der'])}, CA retention {_num(s['ca_retention'])}, {s['wall_seconds']:.0f}s")
    changes = class_changes(s["before"]["per_class_accuracy"], s["after"]["per_class_accuracy"], s["classes"])
    if changes:
        say(
            "largest per-class CA changes: "
            + ", ".join(f"{name} {points:+.1f}" for name, points in changes[:SHOWN_CLASS_CHANGES])
            + " points"
        )
    kept = s["kept"]
    say(f"kept: {kept['tag']} ({kept['rule']})")
    if kept.get("unchanged"):
        say(
            f"warning: {s['method']} kept none of its own states, so {s['output']} has the input model's weights: "
            "no state it "
            f"reached met its rule ({kept['rule']}); its rows above show what each state cost. Loosen the rule "
            "(--param ca_margin=0.05) or try another recipe (--method all compares them)",
            style="yellow",
        )
