"""The options every command shares, declared once: the common flags and the model-loading flags.

`@with_options()` appends the common flags (--device --seed --force --quiet --debug --json) to a
command's signature and hands them to it as one `Common` object; `@with_options(model=PANEL)`
also appends the model flags (--arch --arch-arg --num-classes --input-size --preset --mean --std
--classes --preprocess) as one `ModelFlags`. Typer reads the signature the decorator builds, so the flags,
their spelling and their help live only here.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, TypeVar, cast, get_args

from cleanse.cli.common import DebugOpt, DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, start
from cleanse.cli.model_opts import (
    ArchArgOpt,
    ArchOpt,
    ClassesOpt,
    InputSizeOpt,
    MeanOpt,
    NumClassesOpt,
    PreprocessOpt,
    PresetOpt,
    StdOpt,
    model_options,
)
from cleanse.jobs import RunSettings
from cleanse.models import ModelOptions

F = TypeVar("F", bound=Callable[..., Any])
MODEL_FILE_PANEL = "Model file without cleanse metadata"


@dataclass
class Common:
    """--device, --seed, --force, --quiet, --debug, --json."""

    device: str = "auto"
    seed: int = 0
    force: bool = False
    quiet: bool = False
    debug: bool = False
    json_out: bool = False

    def settings(self) -> RunSettings:
        return RunSettings(device=self.device, seed=self.seed, force=self.force)


@dataclass
class ModelFlags:
    """What the command line says about a model: --arch, --arch-arg, --num-classes, --input-size, --preset, --mean,
    --std, --classes, --preprocess (raw text; `options()` checks and types them)."""

    arch: str | None = None
    arch_arg: list[str] | None = None
    num_classes: int | None = None
    input_size: str | None = None
    preset: str | None = None
    mean: str | None = None
    std: str | None = None
    classes: str | None = None
    preprocess: str | None = None

    def options(self) -> ModelOptions:
        return model_options(
            self.arch,
            self.num_classes,
            self.input_size,
            self.preset,
            self.mean,
            self.std,
            self.classes,
            self.arch_arg,
            self.preprocess,
        )


COMMON_FLAGS: dict[str, Any] = {
    "device": DeviceOpt,
    "seed": SeedOpt,
    "force": ForceOpt,
    "quiet": QuietOpt,
    "debug": DebugOpt,
    "json_out": JsonOpt,
}
MODEL_FLAGS: dict[str, Any] = {
    "arch": ArchOpt,
    "arch_arg": ArchArgOpt,
    "num_classes": NumClassesOpt,
    "input_size": InputSizeOpt,
    "preset": PresetOpt,
    "mean": MeanOpt,
    "std": StdOpt,
    "classes": ClassesOpt,
    "preprocess": PreprocessOpt,
}


def _in_panel(annotation: Any, panel: str) -> Any:
    """The same Annotated option, shown under another --help panel."""
    base, info = get_args(annotation)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[base, info]


def _parameters(flags: dict[str, Any], cls: type, panel: str | None = None) -> list[inspect.Parameter]:
    defaults = {f.name: f.default for f in fields(cls)}
    return [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=defaults[name],
            annotation=_in_panel(annotation, panel) if panel else annotation,
        )
        for name, annotation in flags.items()
    ]


def with_options(model: str | None = None) -> Callable[[F], F]:
    """Give a command the common flags (as `common: Common`) and, with a panel title, the model flags (as
    `model_flags: ModelFlags`). The command's own parameters come first in --help; the shared ones follow."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in ("common", "model_flags")]
        shared = (_parameters(MODEL_FLAGS, ModelFlags, model) if model else []) + _parameters(COMMON_FLAGS, Common)

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            common = Common(**{name: kwargs.pop(name) for name in COMMON_FLAGS})
            start(debug=common.debug, quiet=common.quiet, json_out=common.json_out)
            if model:
                kwargs["model_flags"] = ModelFlags(**{name: kwargs.pop(name) for name in MODEL_FLAGS})
            return command(**kwargs, common=common)

        wrapper.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]  # what typer reads
        return cast(F, wrapper)

    return decorate
