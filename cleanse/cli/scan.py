"""`cleanse scan`: is this model backdoored, which class, and what is the trigger?

Exit 0 clean, 1 suspected, 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cleanse.cli.common import NoCacheOpt, PrecisionOpt, fmt_rate, say
from cleanse.cli.options import MODEL_FILE_PANEL, Common, ModelFlags, with_options
from cleanse.cli.render import LOOP_VIEWS, Column, float_cell, run_job, seconds_cell, show, view
from cleanse.engine.events import Event
from cleanse.jobs import ScanOptions, ScanResult, scan
from cleanse.report.render import audit_table, scan_table
from cleanse.scan import BUDGETS
from cleanse.scan.detectors import DETECTORS

EXIT_SUSPECTED = 1
SCAN_COLUMNS: list[Column] = [
    ("step", "step", float_cell),
    ("reached", "classes reversed", str),
    ("active", "still optimising", str),
    ("smallest", "smallest trigger (class: size)", str),
    ("median_l1", "median size", float_cell),
    ("forwards", "forwards x classes", str),
    ("elapsed", "elapsed", seconds_cell),
]
BUDGET_HELP = "fast | full: " + ", ".join(
    f"{k} = {b.steps} steps x {b.batch} images per class" for k, b in BUDGETS.items()
)


ModelPathArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Model to scan (.safetensors, or a raw state dict with --arch ...).")
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Clean DATA to reverse triggers from (rows marked poisoned are dropped)."),
]
NCleanOpt = Annotated[
    int | None,
    typer.Option(
        "--n-clean",
        help="Clean images to use (80% optimise, 20% measure the reversed triggers); default 500, or 3 per class "
        "when that is more.",
    ),
]
BudgetOpt = Annotated[str, typer.Option("--budget", help=BUDGET_HELP)]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Override the budget's optimisation steps.")]
EarlyStopOpt = Annotated[
    bool,
    typer.Option(
        "--early-stop/--no-early-stop",
        help="Let each class stop once its mask has stopped "
        "shrinking (Neural Cleanse's rule, docs/commands/scan.md); --no-early-stop runs "
        "every class for every step.",
    ),
]
ScheduleOpt = Annotated[
    str,
    typer.Option(
        "--schedule",
        help="auto | screened | every: all classes a quarter of the reverse-engineering budget and only the most "
        "suspicious (at least 3, 20% of the classes) the rest, or every class the whole budget; auto (default): "
        "screened for budgets of 600 steps or more (full), else every (docs/commands/scan.md).",
    ),
]
StatisticOpt = Annotated[
    str,
    typer.Option(
        "--statistic",
        help="loo-z | mad: each class's mask size against the other classes' "
        "mean and std (leave-one-out z, default), or Neural Cleanse's MAD anomaly "
        "index.",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        help="Flag a class whose anomaly index exceeds this on the "
        "small side (default 3.5 for loo-z, 3 for mad; Neural Cleanse: mad, "
        "linear, 2).",
    ),
]
ScaleOpt = Annotated[
    str,
    typer.Option(
        "--scale", help="log | linear: the statistic on log mask norms (default) or raw ones (Neural Cleanse's)."
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Layer for the reversed triggers' TAR: NAME or NAME@HxW (default: the TAR layer; docs/architectures.md).",
    ),
]
AuditDataOpt = Annotated[
    str | None,
    typer.Option(
        "--audit-data",
        help="Also audit this training DATA: flag the classes whose features split in two (or collapse) and "
        "their poisoned rows (audit.json).",
    ),
]
PoisonRateOpt = Annotated[
    float | None,
    typer.Option("--poison-rate", help="Expected poison rate for precision/recall at k (default: the file's own)."),
]
WriteCleanOpt = Annotated[
    Path | None,
    typer.Option(
        "--write-clean",
        help="With --audit-data: write a copy of that DATA without the flagged rows to this .safetensors file "
        "(train and unlearn accept it).",
    ),
]
DetectorsOpt = Annotated[
    str | None,
    typer.Option(
        "--detectors",
        help="Comma-separated detectors to run: "
        + ", ".join(f"{n} ({DETECTORS.get(n).summary})" for n in DETECTORS)
        + ". Default: every one the inputs allow (mmbd alone without --data).",
    ),
]
AlphaOpt = Annotated[
    float, typer.Option("--alpha", help="Level of the p-value detectors (mmbd flags a class with p below it).")
]
MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        metavar="SIZE",
        help="Memory one optimisation step may take, e.g. 4GiB, 512MiB, 2GB or plain bytes; the classes are "
        "optimised in chunks that fit (default: half the device's free memory; on a CPU a forward also holds at "
        "most 256 MiB, which is faster; docs/commands/scan.md).",
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Folder for scan.json, PNGs, trigger files (default <model stem>.scan)."),
]


@with_options(model=MODEL_FILE_PANEL)
def scan_command(
    common: Common,
    model_flags: ModelFlags,
    model_path: ModelPathArg,
    data: DataOpt = None,
    n_clean: NCleanOpt = None,
    budget: BudgetOpt = "full",
    steps: StepsOpt = None,
    early_stop: EarlyStopOpt = True,
    statistic: StatisticOpt = "loo-z",
    threshold: ThresholdOpt = None,
    scale: ScaleOpt = "log",
    layer: LayerOpt = None,
    audit_data: AuditDataOpt = None,
    poison_rate: PoisonRateOpt = None,
    detectors: DetectorsOpt = None,
    alpha: AlphaOpt = 0.05,
    output: OutputOpt = None,
    precision: PrecisionOpt = "auto",
    no_cache: NoCacheOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    write_clean: WriteCleanOpt = None,
    schedule: ScheduleOpt = "auto",
) -> None:
    """Is this model backdoored, and which class? Several detectors, one verdict.

    With clean --data: reverse-engineer the smallest patch, additive and warp trigger of every class (classes
    batched in chunks that fit --memory-budget) and flag anomalously small ones; without data: MM-BD's
    maximum-margin test. docs/commands/scan.md.

    Exit codes: 0 no backdoor found, 1 backdoor suspected, 2 bad input or usage. With --audit-data only, exit 0 \
when it finishes.
    """
    options = ScanOptions(
        model_path,
        model_flags.options(),
        data,
        n_clean,
        budget,
        steps,
        early_stop,
        statistic,
        threshold,
        scale,
        layer,
        audit_data,
        poison_rate,
        None if detectors is None else [d.strip() for d in detectors.split(",") if d.strip()],
        alpha,
        output,
        precision,
        no_cache,
        memory_budget=memory_budget,
        write_clean=write_clean,
        schedule=schedule,
    )
    if run_job(scan, options, common).backdoored:
        raise typer.Exit(EXIT_SUSPECTED)


def _scan_row(event: Event) -> Event:
    """The engine's per-round vectors, summarised for one table row."""
    d = event.data
    best = list(d["best_size"])
    finite = [(v, k) for k, v in enumerate(best) if v != float("inf")]
    smallest = f"{min(finite)[1]}: {min(finite)[0]:.1f}" if finite else "-"
    ordered = sorted(d["size"])
    median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    return Event(
        "row",
        {
            "step": f"{d['step']}/{d['steps']}",
            "reached": f"{len(finite)}/{len(best)}",
            "active": f"{sum(d['active'])}/{len(best)}",
            "smallest": smallest,
            "median_l1": median,
            "forwards": f"{d['forwards']} x {d['chunk']}" if "forwards" in d else "1",  # per step, classes at most
            "elapsed": d["elapsed"],
        },
    )


LOOP_VIEWS["scan"] = (SCAN_COLUMNS, _scan_row)


@view(ScanResult)
def show_scan(result: ScanResult) -> None:
    doc = result.doc
    if "classes" in doc:
        _show_classes(doc)
    if "audit" in doc:
        _show_audit(doc["audit"])
    pictures = ", class-*-<family>.png, sheet.png" if result.reversed_triggers else ""
    say(
        f"wrote scan.json{pictures}{', audit.json' if result.audited else ''} "
        f"to {result.output}/ ({doc['wall_seconds']:.0f}s)"
    )


def _show_audit(a: dict[str, Any]) -> None:
    header, rows = audit_table(a)
    table = Table(
        title=f"data audit per class: a split is flagged at separation >= {a['threshold']} and valley <= "
        f"{a['valley_threshold']}, a class whose spread is < {a['collapse_ratio']} x the other classes' as a whole",
        title_justify="left",
    )
    for i, heading in enumerate(header):
        table.add_column(heading, justify="left" if i in (0, len(header) - 1) else "right")
    for row in rows:
        table.add_row(*row)
    show(table)
    flagged = a["flagged_classes"]
    say(
        f"data audit: {a['flagged_rows']} of {a['n']} rows flagged"
        + (f" in class(es) {', '.join(map(str, flagged))}" if flagged else " (no class is split or collapsed)")
    )
    if a.get("flagged_set"):
        f = a["flagged_set"]
        say(
            f"  against the file's {a['poisoned_rows']} poisoned rows: precision {fmt_rate(f['precision'])}, "
            f"recall {fmt_rate(f['recall'])}"
        )
    for name, v in (a.get("precision_recall") or {}).items():
        say(f"  {name} ranking at k={a['k']}: precision {fmt_rate(v['precision'])} recall {fmt_rate(v['recall'])}")
    if not a["ground_truth"]:
        say("  (the file marks no poisoned rows: no precision or recall)")
    if a.get("cleaned_copy"):
        c = a["cleaned_copy"]
        left = c["rows_before"] - c["rows_removed"]
        say(f"wrote {c['file']}: the audited set without its {c['rows_removed']} flagged rows ({left} left)")
        if c["empty_classes"]:
            say(
                f"  class(es) {', '.join(map(str, c['empty_classes']))} have no rows left: train and unlearn need at "
                "least one image of every class"
            )


def _show_classes(doc: dict[str, Any]) -> None:
    names = doc["detectors_run"]
    table = Table(
        title="detectors per class: the smallest reversed trigger's size and its anomaly index z (small side), "
        "MM-BD's largest margin and p-value; * = flagged",
        title_justify="left",
    )
    header, rows = scan_table(doc)  # the report's table, cell for cell
    for i, heading in enumerate(header):
        table.add_column(heading, justify="left" if i in (0, len(header) - 1) else "right")
    for row in rows:
        table.add_row(*row)
    show(table)
    if doc["backdoored"]:
        names_of = ", ".join(f"{k} ({doc['classes'][k]['name']})" for k in doc["suspected_targets"])
        files = [c["trigger_file"] for d in doc["detectors"].values() for c in d["classes"] if c.get("trigger_file")]
        say(
            f"verdict: BACKDOOR SUSPECTED, target {names_of}"
            + (f"; reversed trigger(s): {', '.join(files)}" if files else "")
            + (f"; unconfirmed (MM-BD only): {doc['unconfirmed']}" if doc["unconfirmed"] else "")
        )
    else:
        unconfirmed = (
            f" (MM-BD alone flagged {doc['unconfirmed']}, which no reverse-engineering detector corroborates)"
            if doc["unconfirmed"]
            else ""
        )
        say(f"verdict: no backdoor found by {', '.join(names)}{unconfirmed}")


def _mmbd_row(event: Event) -> Event:
    d = event.data
    step = f"{d['step']}/{d['steps']}"
    chunks = d.get("chunks", 1)
    row = {
        "step": step if chunks == 1 else f"{step}, chunk {d['chunk']}/{chunks}",
        "active": str(d["active"]),
        "elapsed": d["elapsed"],
    }
    if "classes_done" in d:
        row["done"] = f"{d['classes_done']}/{d['classes']}"
    return Event("row", row)


LOOP_VIEWS["mmbd"] = (
    [
        ("step", "step", str),
        ("active", "classes still climbing", str),
        ("done", "classes done", str),
        ("elapsed", "elapsed", seconds_cell),
    ],
    _mmbd_row,
)
