"""`cleanse explain`: Grad-CAM heatmaps (PNG) and Trigger Attention Ratio figures for a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cleanse.cli.common import NoCacheOpt, say
from cleanse.cli.options import MODEL_FILE_PANEL, Common, ModelFlags, with_options
from cleanse.cli.render import run_job, show, view
from cleanse.jobs import ExplainOptions, ExplainResult, explain

ModelPathArg = Annotated[
    str,
    typer.Argument(metavar="MODEL", help="Model checkpoint (.safetensors, or a raw state dict with --arch ...)."),
]
ImageFilesArg = Annotated[
    list[str] | None, typer.Argument(metavar="[IMAGE]...", help="Image files to explain instead of --data.")
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs, explain.json and run.json.")]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="DATA to draw images from (rows marked poisoned are dropped).")
]
TriggerOpt = Annotated[
    Path | None, typer.Option("--trigger", help="Trigger file: also explain each image's triggered copy, with TAR.")
]
NOpt = Annotated[int, typer.Option("--n", help="How many images to draw from --data (seeded, class-balanced order).")]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help=(
            "Layer to explain: a module name, or NAME@HxW to read its tokens on an HxW grid "
            "(default: the deepest block output with a gradient from the prediction; docs/architectures.md)."
        ),
    ),
]
TargetOpt = Annotated[str, typer.Option("--target", help="Class each map explains: predicted | label | INT.")]


@with_options(model=MODEL_FILE_PANEL)
def explain_command(
    common: Common,
    model_flags: ModelFlags,
    model_path: ModelPathArg,
    image_files: ImageFilesArg = None,
    output: OutputOpt = Path("heatmaps"),
    data: DataOpt = None,
    trigger: TriggerOpt = None,
    n: NOpt = 16,
    layer: LayerOpt = None,
    target: TargetOpt = "predicted",
    no_cache: NoCacheOpt = False,
) -> None:
    """Grad-CAM heatmaps for clean (and triggered) images, with the Trigger Attention Ratio."""
    options = ExplainOptions(
        model_path, model_flags.options(), list(image_files or []), data, output, trigger, n, layer, target, no_cache
    )
    run_job(explain, options, common)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


@view(ExplainResult)
def show_explain(result: ExplainResult) -> None:
    doc = result.doc
    table = Table(
        title=f"Grad-CAM at {doc['layer']}" + (f", TAR at {doc['tar_layer']}" if doc["set"] else ""),
        title_justify="left",
    )
    for header in ("image", "label", "pred (conf)") + (("triggered pred", "TAR", "clean TAR") if doc["set"] else ()):
        table.add_column(header)
    for e in doc["images"]:
        row = [e["source"][-28:], e["label_name"] or "-", f"{e['predicted_name']} ({e['confidence']:.2f})"]
        if doc["set"]:
            row += [
                f"{e['triggered']['predicted_name']} ({e['triggered']['confidence']:.2f})",
                _fmt(e["triggered"]["tar"]),
                _fmt(e["clean_tar"]),
            ]
        table.add_row(*row)
    show(table)
    if doc["set"]:
        s = doc["set"]
        if s["tar"] is not None:
            say(
                f"set TAR {s['tar']:.2f} (median {s['tar_median']:.2f}), attention share {s['attention_share']:.3f}, "
                f"clean TAR {_fmt(s['clean_tar'])}; {s['tar_nulls']} undefined"
            )
        else:
            say(f"full-image trigger: no TAR; cam_shift {_fmt(s['cam_shift'])} (1 - cosine of clean vs triggered maps)")
    count = len(doc["images"])
    say(f"wrote {count} heatmap{'s' if count != 1 else ''}, sheet.png and explain.json to {result.output}/")
