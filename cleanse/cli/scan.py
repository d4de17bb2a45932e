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
from cleanse.scan import BUDGETS

EXIT_SUSPECTED = 1
SCAN_COLUMNS: list[Column] = [
    ("step", "step", float_cell),
    ("reached", "classes reversed", str),
    ("active", "still optimising", str),
    ("smallest", "smallest mask (class: L1)", str),
    ("median_l1", "median L1", float_cell),
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
    int, typer.Option("--n-clean", help="Clean images to use (80% optimise, 20% measure the reversed triggers).")
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
    str | None, typer.Option("--layer", help="Layer for the reversed triggers' TAR (default: the TAR layer).")
]
AuditDataOpt = Annotated[
    str | None, typer.Option("--audit-data", help="Also rank this training DATA's samples by suspicion.")
]
PoisonRateOpt = Annotated[
    float | None,
    typer.Option("--poison-rate", help="Expected poison rate for precision/recall (default: the file's own)."),
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
    n_clean: NCleanOpt = 500,
    budget: BudgetOpt = "full",
    steps: StepsOpt = None,
    early_stop: EarlyStopOpt = True,
    statistic: StatisticOpt = "loo-z",
    threshold: ThresholdOpt = None,
    scale: ScaleOpt = "log",
    layer: LayerOpt = None,
    audit_data: AuditDataOpt = None,
    poison_rate: PoisonRateOpt = None,
    output: OutputOpt = None,
    precision: PrecisionOpt = "auto",
    no_cache: NoCacheOpt = False,
) -> None:
    """Reverse-engineer a trigger per class (Neural Cleanse, all classes batched) and flag anomalously small ones.

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
        output,
        precision,
        no_cache,
    )
    if run_job(scan, options, common).backdoored:
        raise typer.Exit(EXIT_SUSPECTED)


def _scan_row(event: Event) -> Event:
    """The engine's per-round vectors, summarised for one table row."""
    d = event.data
    best = list(d["best_l1"])
    finite = [(v, k) for k, v in enumerate(best) if v != float("inf")]
    smallest = f"{min(finite)[1]}: {min(finite)[0]:.1f}" if finite else "-"
    ordered = sorted(d["mask_l1"])
    median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    return Event(
        "row",
        {
            "step": f"{d['step']}/{d['steps']}",
            "reached": f"{len(finite)}/{len(best)}",
            "active": f"{sum(d['active'])}/{len(best)}",
            "smallest": smallest,
            "median_l1": median,
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
        a = doc["audit"]
        pr = a.get("precision_recall")
        if pr:
            say(
                f"data audit at the expected poison count k={a['k']}: "
                + "; ".join(
                    f"{name} precision {fmt_rate(v['precision'])} recall {fmt_rate(v['recall'])}"
                    for name, v in pr.items()
                )
            )
        else:
            say(
                f"data audit: {a['n']} samples ranked in audit.json"
                + ("" if a["ground_truth"] else " (no ground truth in the file)")
            )
    pictures = ", class-*.png, sheet.png" if result.reversed_triggers else ""
    say(
        f"wrote scan.json{pictures}{', audit.json' if result.audited else ''} "
        f"to {result.output}/ ({doc['wall_seconds']:.0f}s)"
    )


def _show_classes(doc: dict[str, Any]) -> None:
    what = "leave-one-out z" if doc["statistic"] == "loo-z" else "MAD anomaly index"
    table = Table(title=f"reversed triggers ({what} of the {doc['scale']} mask L1 norms)", title_justify="left")
    for header in ("class", "mask L1", "anomaly index", "ASR (held out)", "TAR", "flagged"):
        table.add_column(header, justify="left" if header == "class" else "right")
    for c in doc["classes"]:
        table.add_row(
            f"{c['index']} {c['name']}",
            f"{c['mask_l1']:.1f}",
            f"{c['anomaly_index']:.2f}",
            fmt_rate(c["attack_success_rate"]),
            "-" if c["tar"] is None else f"{c['tar']:.2f}",
            "yes" if c["flagged"] else "",
        )
    show(table)
    if doc["backdoored"]:
        names = ", ".join(f"{k} ({doc['classes'][k]['name']})" for k in doc["suspected_targets"])
        say(f"verdict: BACKDOOR SUSPECTED, target {names}; reversed trigger(s) written as trigger-<class>.safetensors")
    else:
        say(f"verdict: no backdoor found (no anomaly index above {doc['threshold']} on the small side)")
