"""Building the bare network an `--arch` names: a registry name, `torchvision:NAME` or `path/file.py:factory`.

Arguments are checked before anything is built: names that would fetch or point at weights are refused
for every architecture, torchvision builders take only an allow-list, and all values are plain.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanse.errors import CleanseError
from cleanse.files import sha256_file
from cleanse.models.registry import ARCHITECTURES
from cleanse.models.spec import PRESETS, ModelSpec
from cleanse.models.wrapper import ClassifierModel

TORCHVISION_PREFIX = "torchvision:"
# Argument names that would fetch or point at weights: refused for every architecture (MODEL holds the weights).
FORBIDDEN_ARCH_ARGS = frozenset({"weights", "pretrained", "progress", "weights_backbone", "pretrained_backbone"})
# torchvision builders take only these extra keyword arguments (plain numbers, booleans or strings).
TORCHVISION_ARGS = frozenset(
    {
        "dropout",
        "attention_dropout",
        "image_size",
        "width_mult",
        "stochastic_depth_prob",
        "zero_init_residual",
        "aux_logits",
        "transform_input",
        "init_weights",
        "memory_efficient",
        "drop_rate",
    }
)
SIMPLE_ARG_TYPES = (str, int, float, bool)


def is_file_arch(arch: str) -> bool:
    """`arch` has the form path/file.py:factory."""
    path, sep, factory = arch.rpartition(":")
    return bool(sep) and path.endswith(".py") and factory.isidentifier()


def same_file_arch(given: str, stored: str) -> bool:
    """`--arch` names the stored file.py:factory (paths compared after resolving)."""
    if not is_file_arch(given):
        return False
    (gp, _, gf), (sp, _, sf) = given.rpartition(":"), stored.rpartition(":")
    return gf == sf and (gp == sp or Path(gp).resolve() == Path(sp).resolve())


def _load_factory(arch: str) -> tuple[Callable[..., Any], str]:
    """The factory function of a file.py:factory architecture, and the file's sha256."""
    path_text, _, factory = arch.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise CleanseError(f"architecture file {path} does not exist; pass --arch path/to/file.py:factory")
    module_name = "cleanse_user_arch_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CleanseError(f"cannot import architecture file {path}; it must be a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise CleanseError(
            f"architecture file {path} failed to import ({type(exc).__name__}: {exc}); fix the file"
        ) from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise CleanseError(f"architecture file {path} has no callable {factory!r}; name the factory after the colon")
    return fn, sha256_file(path)


def check_arch_args(arch: str, arch_args: dict[str, Any]) -> None:
    """Refuse weight-fetching names and anything but plain values, whoever supplied the arguments."""
    for name, value in arch_args.items():
        if name in FORBIDDEN_ARCH_ARGS:
            raise CleanseError(
                f"--arch-arg {name}=... is refused: cleanse never downloads or loads weights through "
                "the architecture builder; the weights come from MODEL"
            )
        if name == "num_classes":
            raise CleanseError("pass the class count as --num-classes, not as --arch-arg num_classes=...")
        if not isinstance(name, str) or not name.isidentifier() or not isinstance(value, SIMPLE_ARG_TYPES):
            raise CleanseError(
                f"architecture {arch}: argument {name!r} must be a name with a plain value "
                f"(int, float, bool or str), got {type(value).__name__}"
            )


def _unknown_arch(arch: str) -> CleanseError:
    if arch.endswith(".py") or (arch.partition(":")[0].endswith(".py")):
        return CleanseError(f"--arch {arch!r} must name the factory function too: --arch path/to/file.py:factory")
    return CleanseError(
        f"unknown architecture {arch!r}; --arch takes a registry name "
        f"({', '.join(ARCHITECTURES.names())}), torchvision:NAME or path/file.py:factory"
    )


def _build_torchvision(arch: str, num_classes: int, arch_args: dict[str, Any]) -> nn.Module:
    import torchvision

    name = arch[len(TORCHVISION_PREFIX) :]
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise CleanseError(
            f"unknown torchvision classification model {name!r}; "
            "e.g. torchvision:resnet18, torchvision:mobilenet_v3_small"
        )
    bad = sorted(set(arch_args) - TORCHVISION_ARGS)
    if bad:
        raise CleanseError(
            f"torchvision architectures do not take --arch-arg {bad[0]!r}; "
            f"allowed: {', '.join(sorted(TORCHVISION_ARGS))} (weights are never downloaded)"
        )
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **arch_args)
    except (TypeError, ValueError) as exc:
        raise CleanseError(
            f"{arch} failed to build with {arch_args} ({type(exc).__name__}: {exc}); check --arch-arg"
        ) from None


def _build_from_file(arch: str, num_classes: int, arch_args: dict[str, Any]) -> tuple[nn.Module, str]:
    factory, file_sha = _load_factory(arch)
    try:
        net = factory(num_classes=num_classes, **arch_args)
    except Exception as exc:
        raise CleanseError(
            f"{arch} failed to build the model ({type(exc).__name__}: {exc}); the factory must accept "
            f"num_classes{' and the --arch-arg names' if arch_args else ''}"
        ) from None
    if not isinstance(net, nn.Module):
        raise CleanseError(f"{arch} returned {type(net).__name__}, not a torch.nn.Module")
    return net, file_sha


def _build_registered(arch: str, num_classes: int, arch_args: dict[str, Any]) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise _unknown_arch(arch)
    factory = ARCHITECTURES.get(arch)
    allowed = set(inspect.signature(factory).parameters) - {"num_classes"}
    bad = [k for k in arch_args if k not in allowed]
    if bad:
        raise CleanseError(
            f"architecture {arch} does not take argument {bad[0]!r}; it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    try:
        return factory(num_classes=num_classes, **arch_args)
    except ValueError as exc:
        raise CleanseError(f"architecture {arch}: {exc}") from None


def build_net(arch: str, num_classes: int, arch_args: dict[str, Any] | None = None) -> tuple[nn.Module, str | None]:
    """Build the bare network for `arch`; also the sha256 of the architecture file for file.py:factory, else None."""
    arch_args = dict(arch_args or {})
    check_arch_args(arch, arch_args)
    if arch.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(arch, num_classes, arch_args), None
    if is_file_arch(arch):
        return _build_from_file(arch, num_classes, arch_args)
    return _build_registered(arch, num_classes, arch_args), None


def new_model(
    arch: str,
    num_classes: int,
    classes: list[str] | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
    mean: list[float] | None = None,
    std: list[float] | None = None,
    arch_args: dict[str, Any] | None = None,
    seed: int | None = None,
) -> ClassifierModel:
    """A freshly initialised model; with `seed`, its initial weights are reproducible."""
    if seed is None:
        net, file_sha = build_net(arch, num_classes, arch_args)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, file_sha = build_net(arch, num_classes, arch_args)
    mean = list(mean if mean is not None else PRESETS["cifar10"][0])
    std = list(std if std is not None else PRESETS["cifar10"][1])
    spec = ModelSpec(
        arch,
        num_classes,
        list(classes or [str(i) for i in range(num_classes)]),
        (input_size[0], input_size[1], input_size[2]),
        mean,
        std,
        dict(arch_args or {}),
        file_sha,
    )
    return ClassifierModel(net, spec)
