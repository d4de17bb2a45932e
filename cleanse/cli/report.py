"""`cleanse report`: run records -> report.json, report.md and one self-contained report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cleanse.cli.common import NoCacheOpt, say
from cleanse.cli.options import MODEL_FILE_PANEL, Common, ModelFlags, with_options
from cleanse.cli.render import run_job, view
from cleanse.jobs import ReportOptions, ReportResult, report


@with_options(model=MODEL_FILE_PANEL)
def report_command(
    common: Common,
    model_flags: ModelFlags,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[INPUT]...", help="Run records (*.run.json, run.json) or folders of them."),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for report.json, report.md, report.html and the PNGs.")
    ] = Path("report"),
    formats: Annotated[
        str, typer.Option("--format", help="Comma-separated: html, md, json (report.json is always written).")
    ] = "html,md,json",
    model: Annotated[
        str | None, typer.Option("--model", help="Evaluate this model directly (no run record needed).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="Clean DATA for --model's evaluation.")] = None,
    trigger: Annotated[Path | None, typer.Option("--trigger", help="Trigger file for --model's ASR/RA/TAR.")] = None,
    n: Annotated[int, typer.Option("--n", help="Images per Grad-CAM before/after sheet.")] = 8,
    no_cache: NoCacheOpt = False,
) -> None:
    """Build one report from run records (train, scan, unlearn, explain), or evaluate --model directly."""
    options = ReportOptions(
        list(inputs or []), output, formats, model, model_flags.options(), data, trigger, n, no_cache
    )
    run_job(report, options, common)


@view(ReportResult)
def show_report(result: ReportResult) -> None:
    doc = result.doc
    missing = ", ".join(m["section"] for m in doc["missing"]) or "none"
    say(
        f"report from {result.records} run record(s): verdict {doc['verdict'] or 'not scanned'}; "
        f"{len(doc['summary'])} unlearning run(s); missing sections: {missing}"
    )
    say(f"wrote {result.main_file}")
