"""Options that describe a model file lacking cleanse metadata (a raw state dict)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import typer

from cleanse.data.preprocess import PREPROCESSING, check_preprocess
from cleanse.errors import CleanseError
from cleanse.models import ARCHITECTURES, MAX_CHANNELS, MAX_INPUT_PIXELS, PRESETS, ModelOptions, check_arch_args

PANEL = "Model file without cleanse metadata"
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help=f"Architecture: {', '.join(ARCHITECTURES.names())}, torchvision:NAME, timm:NAME, or path/file.py:factory "
        "(train's default: cnn).",
        rich_help_panel=PANEL,
    ),
]
NumClassesOpt = Annotated[
    int | None, typer.Option("--num-classes", help="Number of classes of the model's head.", rich_help_panel=PANEL)
]
InputSizeOpt = Annotated[
    str | None, typer.Option("--input-size", help="C,H,W or H,W (e.g. 3,32,32).", rich_help_panel=PANEL)
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", help=f"Normalisation preset: {' | '.join(PRESETS)}.", rich_help_panel=PANEL)
]
MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", help="Per-channel mean in [0,1] units, e.g. 0.49,0.48,0.45.", rich_help_panel=PANEL),
]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std in [0,1] units.", rich_help_panel=PANEL)]
ClassesOpt = Annotated[
    str | None, typer.Option("--classes", help="Comma-separated class names.", rich_help_panel=PANEL)
]
ArchArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--arch-arg",
        metavar="NAME=VALUE",
        help="Architecture argument, repeatable (e.g. width=32,64,64); stored in written checkpoints.",
        rich_help_panel=PANEL,
    ),
]
PreprocessOpt = Annotated[
    str | None,
    typer.Option(
        "--preprocess",
        help=f"How images of another size are fitted to the model's input: {' | '.join(PREPROCESSING)} "
        "(center-crop: ImageNet-style, shorter side to size/0.875 then the centre crop); stored in written "
        "checkpoints (default: resize).",
        rich_help_panel=PANEL,
    ),
]

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")


def arch_arg_value(text: str) -> Any:
    """An --arch-arg value: int, float, true/false, else the string itself (e.g. "32,64,64")."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_arch_args(items: list[str] | None, arch: str | None = None) -> dict[str, Any]:
    """`--arch-arg NAME=VALUE` items as typed keyword arguments; weights/pretrained and non-names exit 2."""
    args: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise CleanseError(f"--arch-arg {item!r} must look like NAME=VALUE, e.g. --arch-arg width=32,64,64")
        if name in args:
            raise CleanseError(f"--arch-arg {name} is given twice; give each name once")
        args[name] = arch_arg_value(value.strip())
    check_arch_args(arch or "--arch", args)
    return args


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CleanseError(f"{flag} {text!r} must be comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise CleanseError(f"{flag} {text!r} must be finite numbers, e.g. 0.5,0.5,0.5")
    return values


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        values = [3, *values]
    if len(values) != 3 or min(values) < 1:
        raise CleanseError(f"--input-size {text!r} must be C,H,W or H,W with positive integers")
    if values[0] > MAX_CHANNELS or values[1] * values[2] > MAX_INPUT_PIXELS:
        raise CleanseError(
            f"--input-size {text!r} is too large (at most {MAX_CHANNELS} channels and {MAX_INPUT_PIXELS} pixels)"
        )
    return (values[0], values[1], values[2])


def normalization(
    preset: str | None, mean: str | None, std: str | None
) -> tuple[list[float] | None, list[float] | None]:
    if preset is not None:
        if preset not in PRESETS:
            raise CleanseError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        if mean is not None or std is not None:
            raise CleanseError("--preset and --mean/--std are exclusive; pass one or the other")
        preset_mean, preset_std = PRESETS[preset]
        return list(preset_mean), list(preset_std)
    m, s = _floats(mean, "--mean"), _floats(std, "--std")
    if (m is None) != (s is None):
        raise CleanseError("--mean and --std go together; pass both (or --preset)")
    if s is not None and any(v <= 0 for v in s):
        raise CleanseError("--std values must be positive")
    return m, s


def model_options(
    arch: str | None,
    num_classes: int | None,
    input_size: str | None,
    preset: str | None,
    mean: str | None,
    std: str | None,
    classes: str | None,
    arch_args: list[str] | None = None,
    preprocess: str | None = None,
) -> ModelOptions:
    """What the command line says about MODEL, checked and typed."""
    m, s = normalization(preset, mean, std)
    size = parse_input_size(input_size)
    if preset == "none" and size is not None and m is not None:
        m, s = [0.0] * size[0], [1.0] * size[0]  # identity normalisation for any channel count
    if m is not None and size is not None and len(m) != size[0]:
        raise CleanseError(f"--mean/--std have {len(m)} values but --input-size has {size[0]} channels")
    if num_classes is not None and num_classes < 1:
        raise CleanseError("--num-classes must be at least 1")
    names = [c.strip() for c in classes.split(",")] if classes else None
    if preprocess is not None:
        check_preprocess(preprocess)
    return ModelOptions(arch, num_classes, size, m, s, names, parse_arch_args(arch_args, arch) or None, preprocess)
