"""Building the bare network an `--arch` names: a registry name, `torchvision:NAME`, `timm:NAME` or
`path/file.py:factory`.

Arguments are checked before anything is built: names that would fetch or point at weights are refused
for every architecture, torchvision builders take only an allow-list, and all values are plain.

Networks whose size is fixed at construction (vision transformers) get it from the model's input size:
`size_args` adds `image_size` (registry factories that take it, torchvision `vit_*`) or `img_size` (timm models
whose pretrained config says `fixed_input_size`). Those values are never stored in a checkpoint's arguments:
they follow from its `input_size` at every build, so loading rebuilds the same network.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
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
TIMM_PREFIX = "timm:"
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
# timm's create_model also takes these, which name weights, configs or files: refused for timm:NAME.
TIMM_FORBIDDEN_ARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"})
TIMM_MISSING = "--arch timm:NAME needs the timm package; install it with pip install 'cleanse[timm]'"
SIMPLE_ARG_TYPES = (str, int, float, bool)
InputSize = tuple[int, int, int]


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
        if name in FORBIDDEN_ARCH_ARGS or (arch.startswith(TIMM_PREFIX) and name in TIMM_FORBIDDEN_ARGS):
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
        f"({', '.join(ARCHITECTURES.names())}), torchvision:NAME, timm:NAME or path/file.py:factory"
    )


def _square_side(arch: str, key: str, arch_args: Mapping[str, Any], input_size: InputSize) -> int:
    """The one side of a network that takes only square inputs of exactly `key` pixels; an explicit `key` must
    agree with the input size."""
    _, height, width = input_size
    if height != width:
        raise CleanseError(
            f"{arch} takes only square inputs ({key} is one side) but the input size is {height}x{width}; "
            "use square images (or --input-size C,S,S for a raw state dict)"
        )
    given = arch_args.get(key)
    if given is not None and given != height:
        raise CleanseError(
            f"--arch-arg {key}={given} disagrees with the input size {height}x{width} ({arch} accepts only "
            f"{key} x {key} inputs); drop --arch-arg {key}: cleanse sets it from the input size"
        )
    return height


def _timm() -> Any:
    """The timm module, or the one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise CleanseError(TIMM_MISSING) from None
    return timm


@functools.cache
def _timm_models() -> frozenset[str]:
    return frozenset(_timm().list_models())


def _timm_name(arch: str) -> str:
    """The timm architecture name of `timm:NAME`; unknown names fail with close matches."""
    name = arch[len(TIMM_PREFIX) :]
    known = _timm_models()
    if name in known:
        return name
    base, dot, tag = name.partition(".")
    if dot and base in known:
        raise CleanseError(
            f"--arch {arch}: '.{tag}' names pretrained weights, which cleanse never loads; "
            f"pass --arch {TIMM_PREFIX}{base}"
        )
    close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
    hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else "e.g. timm:resnet18"
    raise CleanseError(f"unknown timm model {name!r}; {hint} (timm.list_models() lists them all)")


def _torchvision_size_args(arch: str, arch_args: Mapping[str, Any], input_size: InputSize) -> dict[str, Any]:
    # torchvision's ViT builders take image_size (default 224) and accept only image_size x image_size inputs
    if not arch[len(TORCHVISION_PREFIX) :].startswith("vit_"):
        return {}
    side = _square_side(arch, "image_size", arch_args, input_size)
    return {} if "image_size" in arch_args else {"image_size": side}


def _timm_size_args(name: str, arch_args: Mapping[str, Any], input_size: InputSize) -> dict[str, Any]:
    # timm's own contract (timm.models._builder): a pretrained config with fixed_input_size marks a model whose
    # img_size argument fixes its input size; timm fills img_size and in_chans from the config's input_size.
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None or not cfg.input_size:
        return {}
    channels, height, width = input_size
    filled: dict[str, Any] = {}
    if "in_chans" not in arch_args and channels != cfg.input_size[0]:
        filled["in_chans"] = channels
    if cfg.fixed_input_size and "img_size" not in arch_args:
        filled["img_size"] = height if height == width else (height, width)
    return filled


def _registered_size_args(arch: str, arch_args: Mapping[str, Any], input_size: InputSize) -> dict[str, Any]:
    param = inspect.signature(ARCHITECTURES.get(arch)).parameters.get("image_size")
    if param is None:
        return {}
    side = _square_side(arch, "image_size", arch_args, input_size)
    return {} if "image_size" in arch_args else {"image_size": side}


def size_args(arch: str, arch_args: Mapping[str, Any], input_size: InputSize | None) -> dict[str, Any]:
    """The size arguments cleanse passes when building `arch` for `input_size` (C, H, W); empty when it needs none.

    - registry factories with an `image_size` parameter (`vit`): `image_size=S`;
    - `torchvision:vit_*`: `image_size=S` (torchvision's ViT takes only S x S inputs; its own default is 224);
    - `timm:NAME` whose pretrained config has `fixed_input_size` (timm's own mark of a model whose `img_size` fixes
      its input size: ViT, DeiT, Swin, ...): `img_size=S` or `(H, W)`; any timm model: `in_chans=C` when C differs
      from its config's. Other timm models (CNNs) take any input size and get no `img_size`.
    At the model's own default size these change nothing. An argument given explicitly wins; a torchvision or
    registry `image_size` must then agree with the input size. Non-square inputs to a network that takes only
    square ones are a CleanseError. Nothing is added without `input_size` or for a file.py:factory architecture.
    """
    if input_size is None or is_file_arch(arch):
        return {}
    if arch.startswith(TORCHVISION_PREFIX):
        return _torchvision_size_args(arch, arch_args, input_size)
    if arch.startswith(TIMM_PREFIX):
        return _timm_size_args(_timm_name(arch), arch_args, input_size)
    return _registered_size_args(arch, arch_args, input_size) if arch in ARCHITECTURES else {}


def _build_torchvision(
    arch: str, num_classes: int, arch_args: dict[str, Any], input_size: InputSize | None
) -> nn.Module:
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
    filled = size_args(arch, arch_args, input_size)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **arch_args, **filled)
    except (TypeError, ValueError) as exc:
        raise CleanseError(
            f"{arch} failed to build with {arch_args} ({type(exc).__name__}: {exc}); check --arch-arg"
        ) from None


def _build_timm(arch: str, num_classes: int, arch_args: dict[str, Any], input_size: InputSize | None) -> nn.Module:
    timm = _timm()
    filled = size_args(arch, arch_args, input_size)  # checks the name first
    try:
        net = timm.create_model(_timm_name(arch), pretrained=False, num_classes=num_classes, **arch_args, **filled)
    except (TypeError, ValueError, AssertionError) as exc:  # timm checks its arguments with asserts too
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unexpected and unexpected.group(1) in filled:
            raise CleanseError(
                f"{arch} does not take {unexpected.group(1)}, which cleanse passes to build it for this input size "
                f"({filled}); use the input size of its timm pretrained config"
            ) from None
        if unexpected:
            raise CleanseError(f"{arch} does not take --arch-arg {unexpected.group(1)!r}; check --arch-arg") from None
        raise CleanseError(
            f"{arch} failed to build with --arch-arg {arch_args or 'none'} ({type(exc).__name__}: {exc}); "
            "check --arch-arg"
        ) from None
    if not isinstance(net, nn.Module):
        raise CleanseError(f"{arch} built {type(net).__name__}, not a torch.nn.Module")
    return net


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


def _build_registered(
    arch: str, num_classes: int, arch_args: dict[str, Any], input_size: InputSize | None
) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise _unknown_arch(arch)
    factory = ARCHITECTURES.get(arch)
    allowed = set(inspect.signature(factory).parameters) - {"num_classes"}
    bad = [k for k in arch_args if k not in allowed]
    if bad:
        raise CleanseError(
            f"architecture {arch} does not take argument {bad[0]!r}; it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    filled = size_args(arch, arch_args, input_size)
    try:
        return factory(num_classes=num_classes, **arch_args, **filled)
    except ValueError as exc:
        raise CleanseError(f"architecture {arch}: {exc}") from None


def build_net(
    arch: str,
    num_classes: int,
    arch_args: dict[str, Any] | None = None,
    input_size: InputSize | None = None,
) -> tuple[nn.Module, str | None]:
    """Build the bare network for `arch`; also the sha256 of the architecture file for file.py:factory, else None.

    With `input_size` (C, H, W), networks whose size is fixed at construction are built for it (`size_args`).
    """
    arch_args = dict(arch_args or {})
    check_arch_args(arch, arch_args)
    if is_file_arch(arch):
        return _build_from_file(arch, num_classes, arch_args)
    if arch.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(arch, num_classes, arch_args, input_size), None
    if arch.startswith(TIMM_PREFIX):
        return _build_timm(arch, num_classes, arch_args, input_size), None
    return _build_registered(arch, num_classes, arch_args, input_size), None


def new_model(
    arch: str,
    num_classes: int,
    classes: list[str] | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
    mean: list[float] | None = None,
    std: list[float] | None = None,
    arch_args: dict[str, Any] | None = None,
    seed: int | None = None,
    preprocess: str = "resize",
) -> ClassifierModel:
    """A freshly initialised model for `input_size` inputs; with `seed`, its initial weights are reproducible.
    `preprocess` is how data of another size will be fitted to it (recorded in its checkpoints)."""
    if seed is None:
        net, file_sha = build_net(arch, num_classes, arch_args, input_size)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, file_sha = build_net(arch, num_classes, arch_args, input_size)
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
        preprocess=preprocess,
    )
    return ClassifierModel(net, spec)
