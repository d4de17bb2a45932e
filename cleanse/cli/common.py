"""Options every subcommand accepts, the stderr console, and small output helpers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cleanse.errors import CleanseError

DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N] | mps.", rich_help_panel="Common")]
MAX_SEED = 2**32 - 1  # seeds are combined arithmetically (seed + 1, seed * 1000 + class) and must stay in 64 bits
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        min=0,
        max=MAX_SEED,
        help="Random seed (0..4294967295); the same seed gives the same result.",
        rich_help_panel="Common",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.", rich_help_panel="Common")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json).", rich_help_panel="Common")
]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks for internal errors.", rich_help_panel="Common")
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document on stdout; human output goes to stderr.", rich_help_panel="Common"
    ),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Decode image folders afresh instead of using the cache.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train | test, for CIFAR python-batch folders.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware runs it natively, else fp16 on CUDA GPUs with "
        "tensor cores, else fp32; scan runs fp16 as fp32).",
    ),
]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="NAME=VALUE, repeatable.")]


@dataclass
class Session:
    """Per-invocation settings shared by the CLI modules."""

    debug: bool = False
    quiet: bool = False
    json: bool = False
    progress: str | None = (
        None  # where a long loop is, e.g. "during epoch 3/50 of train cnn", for the interrupt message
    )
    resume_file: Path | None = (
        None  # the checkpoint an interrupted run leaves for --resume, named in the message if it exists
    )


SESSION = Session()
console = Console(stderr=True, highlight=False)


def start(*, debug: bool, quiet: bool, json_out: bool) -> Session:
    SESSION.debug, SESSION.quiet, SESSION.json = debug, quiet, json_out
    SESSION.progress = SESSION.resume_file = None
    return SESSION


def say(message: str, style: str | None = None) -> None:
    if not SESSION.quiet:
        console.print(message, style=style, markup=False, soft_wrap=True)


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def parse_params(items: list[str] | None) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CleanseError(f"--param {item!r} must look like NAME=VALUE")
        params[name.strip()] = value.strip()
    return params


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
