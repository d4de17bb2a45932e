"""`cleanse demo`: the whole story on built-in data: poison -> train -> scan -> unlearn -> explain -> report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cleanse.cli.common import say
from cleanse.cli.options import Common, with_options
from cleanse.cli.render import metrics_table, run_job, show, view
from cleanse.jobs import DemoOptions, DemoResult, demo


@with_options()
def demo_command(
    common: Common,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's files.")] = Path("cleanse-demo"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller model, fewer epochs and scan steps (used by the tests).")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (default 8, 6 with --quick).")] = 0,
) -> None:
    """Poison the synthetic set with BadNets, train a cnn, scan it, clean it with tar-ewc, explain before/after, \
and report."""
    run_job(demo, DemoOptions(output, quick, epochs), common)


@view(DemoResult)
def show_demo(result: DemoResult) -> None:
    show(
        metrics_table(
            "tar-ewc on synthetic:test: before -> after",
            [("before", result.row["before"]), ("after", result.row["after"])],
        )
    )
    say(f"scan verdict: {result.verdict}; report: {result.report_file} ({result.wall_seconds:.0f}s in all)")
