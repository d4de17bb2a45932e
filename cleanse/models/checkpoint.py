"""Model checkpoints: bare state_dict tensors + one `cleanse` JSON metadata document.

The model wrapper applies the checkpoint's mean/std inside `forward`, so every
engine function feeds it float images in [0, 1] (pixel space). Saved
state_dicts are the bare architecture's, without the wrapper prefix.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanse.errors import CleanseError
from cleanse.files import read_cleanse_metadata, read_safetensors, sha256_file, write_safetensors
from cleanse.models.registry import ARCHITECTURES
from cleanse.version import __version__

MODEL_FORMAT = "cleanse.model"
FORMAT_VERSION = 1
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
TORCHVISION_PREFIX = "torchvision:"
# Argument names that would fetch or point at weights: refused for every architecture (MODEL holds the weights).
FORBIDDEN_ARCH_ARGS = frozenset({"weights", "pretrained", "progress", "weights_backbone", "pretrained_backbone"})
# torchvision builders take only these extra keyword arguments (plain numbers, booleans or strings).
TORCHVISION_ARGS = frozenset({"dropout", "attention_dropout", "image_size", "width_mult", "stochastic_depth_prob",
                              "zero_init_residual", "aux_logits", "transform_input", "init_weights", "memory_efficient",
                              "drop_rate"})
SIMPLE_ARG_TYPES = (str, int, float, bool)


@dataclass
class ModelSpec:
    """Everything needed to rebuild and use a model, as stored in the checkpoint metadata."""

    arch: str
    num_classes: int
    classes: list[str]
    input_size: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    arch_args: dict[str, Any] = field(default_factory=dict)
    arch_file_sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, Any]:
        doc = {
            "format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "cleanse_version": __version__,
            "arch": {"name": self.arch, "args": self.arch_args}, "num_classes": self.num_classes,
            "classes": self.classes, "input_size": list(self.input_size),
            "normalization": {"mean": self.mean, "std": self.std}, "provenance": self.provenance,
        }
        if self.arch_file_sha256:
            doc["arch"]["file_sha256"] = self.arch_file_sha256
        return doc


@dataclass
class ModelOptions:
    """What the user said on the command line about a model (for raw state dicts, or to check metadata)."""

    arch: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    classes: list[str] | None = None
    arch_args: dict[str, Any] | None = None  # --arch-arg NAME=VALUE, already typed


class ClassifierModel(nn.Module):
    """Wraps the bare network; takes [0, 1] images and normalises them itself."""

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        channels = spec.input_size[0]
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1), persistent=False)
        self.notes: list[str] = []  # warnings from loading, shown by the CLI
        self.source_sha256: str | None = None  # sha256 of the file it was loaded from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def _is_file_arch(arch: str) -> bool:
    path, sep, factory = arch.rpartition(":")
    return bool(sep) and path.endswith(".py") and factory.isidentifier()


def _same_file_arch(given: str | None, stored: str) -> bool:
    """`--arch` names the stored file.py:factory (paths compared after resolving)."""
    if given is None or not _is_file_arch(given):
        return False
    (gp, _, gf), (sp, _, sf) = given.rpartition(":"), stored.rpartition(":")
    return gf == sf and (gp == sp or Path(gp).resolve() == Path(sp).resolve())


def _load_factory(arch: str):  # noqa: ANN202
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
        raise CleanseError(f"architecture file {path} failed to import ({type(exc).__name__}: {exc}); fix the file") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise CleanseError(f"architecture file {path} has no callable {factory!r}; name the factory after the colon")
    return fn, sha256_file(path)


def check_arch_args(arch: str, arch_args: dict[str, Any]) -> None:
    """Refuse weight-fetching names and anything but plain values, whoever supplied the arguments."""
    for name, value in arch_args.items():
        if name in FORBIDDEN_ARCH_ARGS:
            raise CleanseError(f"--arch-arg {name}=... is refused: cleanse never downloads or loads weights through the "
                               "architecture builder; the weights come from MODEL")
        if name == "num_classes":
            raise CleanseError("pass the class count as --num-classes, not as --arch-arg num_classes=...")
        if not isinstance(name, str) or not name.isidentifier() or not isinstance(value, SIMPLE_ARG_TYPES):
            raise CleanseError(f"architecture {arch}: argument {name!r} must be a name with a plain value "
                               f"(int, float, bool or str), got {type(value).__name__}")


def _unknown_arch(arch: str) -> CleanseError:
    if arch.endswith(".py") or (arch.partition(":")[0].endswith(".py")):
        return CleanseError(f"--arch {arch!r} must name the factory function too: --arch path/to/file.py:factory")
    return CleanseError(f"unknown architecture {arch!r}; --arch takes a registry name ({', '.join(ARCHITECTURES.names())}), "
                        "torchvision:NAME or path/file.py:factory")


def build_net(arch: str, num_classes: int, arch_args: dict[str, Any] | None = None) -> tuple[nn.Module, str | None]:
    """Build the bare network for `arch`: a registry name, torchvision:NAME or file.py:factory."""
    arch_args = dict(arch_args or {})
    check_arch_args(arch, arch_args)
    file_sha = None
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch[len(TORCHVISION_PREFIX):]
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise CleanseError(f"unknown torchvision classification model {name!r}; e.g. torchvision:resnet18, torchvision:mobilenet_v3_small")
        bad = sorted(set(arch_args) - TORCHVISION_ARGS)
        if bad:
            raise CleanseError(f"torchvision architectures do not take --arch-arg {bad[0]!r}; allowed: {', '.join(sorted(TORCHVISION_ARGS))} "
                               "(weights are never downloaded)")
        try:
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **arch_args)
        except (TypeError, ValueError) as exc:
            raise CleanseError(f"{arch} failed to build with {arch_args} ({type(exc).__name__}: {exc}); check --arch-arg") from None
    elif _is_file_arch(arch):
        factory, file_sha = _load_factory(arch)
        try:
            net = factory(num_classes=num_classes, **arch_args)
        except Exception as exc:
            raise CleanseError(f"{arch} failed to build the model ({type(exc).__name__}: {exc}); the factory must accept num_classes"
                               f"{' and the --arch-arg names' if arch_args else ''}") from None
        if not isinstance(net, nn.Module):
            raise CleanseError(f"{arch} returned {type(net).__name__}, not a torch.nn.Module")
    else:
        if arch not in ARCHITECTURES:
            raise _unknown_arch(arch)
        factory = ARCHITECTURES.get(arch)
        allowed = set(inspect.signature(factory).parameters) - {"num_classes"}
        bad = [k for k in arch_args if k not in allowed]
        if bad:
            raise CleanseError(f"architecture {arch} does not take argument {bad[0]!r}; it takes: {', '.join(sorted(allowed)) or 'none'}")
        try:
            net = factory(num_classes=num_classes, **arch_args)
        except ValueError as exc:
            raise CleanseError(f"architecture {arch}: {exc}") from None
    return net, file_sha


def new_model(arch: str, num_classes: int, classes: list[str] | None = None, input_size: tuple[int, int, int] = (3, 32, 32),
              mean: list[float] | None = None, std: list[float] | None = None, arch_args: dict[str, Any] | None = None,
              seed: int | None = None) -> ClassifierModel:
    """A freshly initialised model; with `seed`, its initial weights are reproducible."""
    if seed is None:
        net, file_sha = build_net(arch, num_classes, arch_args)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, file_sha = build_net(arch, num_classes, arch_args)
    mean = list(mean if mean is not None else PRESETS["cifar10"][0])
    std = list(std if std is not None else PRESETS["cifar10"][1])
    spec = ModelSpec(arch, num_classes, list(classes or [str(i) for i in range(num_classes)]), tuple(input_size), mean, std,
                     dict(arch_args or {}), file_sha)
    return ClassifierModel(net, spec)


def save_model(model: ClassifierModel, path: str | Path, provenance: dict[str, Any] | None = None) -> None:
    if provenance is not None:
        model.spec.provenance = provenance
    state = {k: v for k, v in model.net.state_dict().items()}
    write_safetensors(path, state, model.spec.to_metadata())


# --- loading -----------------------------------------------------------------

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _align_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Drop one leading name shared by every key (`model.`, `net.`, ...) when that makes the keys fit exactly."""
    if set(state) == expected or not state:
        return state, None
    first = next(iter(state)).split(".", 1)[0] + "."
    if all(k.startswith(first) for k in state) and {k[len(first):] for k in state} == expected:
        return {k[len(first):]: v for k, v in state.items()}, first
    return state, None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict itself, or the one nested in a training checkpoint ({"state_dict": ..., "epoch": 3, ...})."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        nested = [str(k) for k, v in obj.items() if _is_state_dict(v)]
        if len(nested) == 1:
            return obj[nested[0]]
        if nested:
            raise CleanseError(f"{path}: holds several state dicts ({', '.join(nested[:4])}); save the one to audit on its own, "
                               "e.g. torch.save(ckpt[KEY], PATH)")
        keys = ", ".join(str(k) for k in list(obj)[:6])
        raise CleanseError(f"{path}: no state dict of tensors found (top-level keys: {keys or 'none'}; looked for "
                           f"{', '.join(STATE_DICT_KEYS)}); save model.state_dict() with torch.save")
    raise CleanseError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict() with torch.save")


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A `.pt`/`.pth` state dict, read with torch.load(weights_only=True): a pickled object is refused, never run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise CleanseError(f"{path}: refused to load: not a plain state dict of tensors (it pickles {found.group(1)}, which is "
                               "never run; weights_only); save model.state_dict() with torch.save, or convert to safetensors") from None
        found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        reason = found.group(1) if found else (text.strip().splitlines() or [type(exc).__name__])[0]
        raise CleanseError(f"{path}: refused to load: not a plain state dict of tensors, or not a torch file "
                           f"(weights_only: {reason[:160]}); save model.state_dict() with torch.save, or convert to safetensors") from None
    return _find_state_dict(obj, path)


MAX_INPUT_PIXELS = 50_000_000  # the ImageFolder decompression-bomb limit: no model input may be larger
MAX_CHANNELS = 64


def _check_list(value: Any, kind: type | tuple[type, ...], length: int | None, what: str, path: Path) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value) or (length is not None and len(value) != length):
        raise CleanseError(f"{path}: metadata {what} is malformed; re-create the checkpoint with cleanse")
    if kind != str and not all(math.isfinite(v) for v in value):
        raise CleanseError(f"{path}: metadata {what} is malformed (not finite); re-create the checkpoint with cleanse")
    return value


def _check_input_size(size: list[int], path: Path) -> None:
    c, h, w = size
    if not (1 <= c <= MAX_CHANNELS and h >= 1 and w >= 1 and h * w <= MAX_INPUT_PIXELS):
        raise CleanseError(f"{path}: metadata 'input_size' is malformed ({size}: C,H,W must be positive with at most "
                           f"{MAX_INPUT_PIXELS} pixels); re-create the checkpoint with cleanse")


def parse_model_metadata(doc: dict[str, Any], path: Path | str) -> ModelSpec:
    """The ModelSpec a checkpoint's `cleanse` metadata describes; anything malformed is a CleanseError."""
    return _spec_from_metadata(doc, Path(path))


def _spec_from_metadata(doc: dict[str, Any], path: Path) -> ModelSpec:
    if doc.get("format") != MODEL_FORMAT:
        raise CleanseError(f"{path}: this is a {doc.get('format', 'unknown')!s} file, not a model checkpoint; pass a model file")
    if doc.get("format_version") != FORMAT_VERSION or isinstance(doc.get("format_version"), bool):
        raise CleanseError(f"{path}: checkpoint format version {doc.get('format_version')!r} is not supported (this cleanse reads {FORMAT_VERSION})")
    arch = doc.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("args", {}), dict):
        raise CleanseError(f"{path}: metadata 'arch' must be {{'name': str, 'args': {{...}}}}; re-create the checkpoint with cleanse")
    num_classes = doc.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CleanseError(f"{path}: metadata 'num_classes' must be a positive integer; re-create the checkpoint with cleanse")
    size = _check_list(doc.get("input_size"), int, 3, "'input_size'", path)
    _check_input_size(size, path)
    norm = doc.get("normalization")
    if not isinstance(norm, dict):
        raise CleanseError(f"{path}: metadata 'normalization' is missing; re-create the checkpoint with cleanse")
    mean = [float(v) for v in _check_list(norm.get("mean"), (int, float), size[0], "'normalization.mean'", path)]
    std = [float(v) for v in _check_list(norm.get("std"), (int, float), size[0], "'normalization.std'", path)]
    if any(s <= 0 for s in std):
        raise CleanseError(f"{path}: metadata normalization std must be positive")
    classes = _check_list(doc.get("classes"), str, num_classes, "'classes'", path)
    provenance = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
    return ModelSpec(arch["name"], num_classes, classes, tuple(size), mean, std, dict(arch.get("args", {})),
                     arch.get("file_sha256"), provenance)


def _natural(key: str) -> tuple:
    """Sort key for state-dict names: layer2.10 after layer2.9 (safetensors files store keys in no useful order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _head_hint(state: dict[str, torch.Tensor]) -> str:
    """'head.weight has 10 outputs' from the last 2-D weight by name (usually the classifier), for error messages."""
    for key in sorted(state, key=_natural, reverse=True):
        if key.endswith("weight") and state[key].dim() == 2:
            return f"; {key} has {state[key].shape[0]} outputs"
    return ""


def _spec_from_options(options: ModelOptions, path: Path, state: dict[str, torch.Tensor]) -> tuple[ModelSpec, list[str]]:
    """The spec of a raw state dict, from the command line; also notes naming the defaults it assumed."""
    missing = [flag for flag, value in (("--arch", options.arch), ("--num-classes", options.num_classes)) if value is None]
    if missing:
        forms = {"--arch": "--arch NAME|torchvision:NAME|path/file.py:factory", "--num-classes": f"--num-classes N{_head_hint(state)}"}
        raise CleanseError(f"{path}: raw state dict without cleanse metadata; add {' and '.join(missing)} "
                           f"({', '.join(forms[flag] for flag in missing)}), and --input-size C,H,W and "
                           "--preset cifar10|imagenet|none or --mean/--std when not 3,32,32 with CIFAR-10 normalisation")
    assert options.arch is not None and options.num_classes is not None
    notes = []
    size = options.input_size or (3, 32, 32)
    if options.mean is None or options.std is None:
        if size[0] != 3:
            raise CleanseError(f"{path}: raw state dict for {size[0]}-channel inputs; add --mean and --std with {size[0]} values each")
        mean, std = list(PRESETS["cifar10"][0]), list(PRESETS["cifar10"][1])
    else:
        mean, std = list(options.mean), list(options.std)
    if len(mean) != size[0] or len(std) != size[0]:
        raise CleanseError(f"--mean/--std have {len(mean)}/{len(std)} values but the inputs have {size[0]} channels; give one per channel")
    assumed = [text for text, given in (("--input-size 3,32,32", options.input_size), ("--preset cifar10", options.mean)) if given is None]
    if assumed:
        notes.append(f"note: {path.name} is a raw state dict: assuming {' and '.join(assumed)} (give the option"
                     f"{'s' if len(assumed) > 1 else ''} if the model expects otherwise)")
    classes = options.classes or [str(i) for i in range(options.num_classes)]
    if len(classes) != options.num_classes:
        raise CleanseError(f"--classes names {len(classes)} classes but --num-classes is {options.num_classes}; give one name per class")
    spec = ModelSpec(options.arch, options.num_classes, list(classes), tuple(size), mean, std, dict(options.arch_args or {}))
    return spec, notes


def _same_args(given: dict[str, Any], stored: dict[str, Any]) -> bool:
    return {k: str(v) for k, v in given.items()} == {k: str(v) for k, v in stored.items()}


def _reconcile(spec: ModelSpec, options: ModelOptions, path: Path) -> None:
    checks = (("--arch", options.arch, spec.arch), ("--num-classes", options.num_classes, spec.num_classes),
              ("--input-size", options.input_size and tuple(options.input_size), tuple(spec.input_size)),
              ("--mean", options.mean, spec.mean), ("--std", options.std, spec.std))
    for flag, given, stored in checks:
        if given is not None and (given != stored if not isinstance(stored, list) else len(given) != len(stored) or not torch.allclose(
                torch.tensor(given, dtype=torch.float32), torch.tensor(stored, dtype=torch.float32))):
            raise CleanseError(f"{path}: {flag} {given} disagrees with the checkpoint's metadata ({stored}); drop {flag}")
    if options.arch_args and not _same_args(options.arch_args, spec.arch_args):
        raise CleanseError(f"{path}: --arch-arg {options.arch_args} disagrees with the checkpoint's metadata ({spec.arch_args}); drop --arch-arg")
    if options.classes is not None:
        if len(options.classes) != spec.num_classes:
            raise CleanseError(f"--classes names {len(options.classes)} classes but the model has {spec.num_classes}")
        spec.classes = list(options.classes)


def _first(keys: list[str], n: int = 3) -> str:
    return f"{', '.join(keys[:n])}{' ...' if len(keys) > n else ''} ({len(keys)})"


def describe_mismatch(net: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec) -> str | None:
    """One line naming the first missing/unexpected/mis-shaped keys and the likely cause, or None when the weights fit."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = sorted((k for k in state if k not in expected), key=_natural)
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_first(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
        parts.append(f"shape mismatches {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''} ({len(shapes)})")
    head_only = not missing and not unexpected and all(
        expected[k].dim() >= 1 and state[k].dim() == expected[k].dim() and expected[k].shape[0] == spec.num_classes
        and state[k].shape[0] != spec.num_classes and state[k].shape[1:] == expected[k].shape[1:] for k in mismatched)
    if head_only:
        counts = sorted({int(state[k].shape[0]) for k in mismatched})
        cause = f"wrong class count (--num-classes {spec.num_classes})"
        if len(counts) == 1:
            cause += f"; the weights have {counts[0]} classes: pass --num-classes {counts[0]}"
    elif not missing and not unexpected:
        given = ",".join(f"{k}={v}" for k, v in spec.arch_args.items()) or "none"
        cause = (f"wrong architecture arguments (--arch-arg, given: {given}): the layer names fit {spec.arch} "
                 "but their sizes do not; or a different --arch")
    else:
        cause = f"wrong architecture (--arch {spec.arch}); the file's first keys are {', '.join(sorted(state, key=_natural)[:2])}"
    return f"weights do not fit {spec.arch}: {'; '.join(parts)}; likely cause: {cause}"


def load_model(path: str | Path, options: ModelOptions | None = None, device: torch.device | str = "cpu") -> ClassifierModel:
    """Load a cleanse checkpoint or a raw state dict (.safetensors/.pt/.pth), strictly."""
    path = Path(path)
    options = options or ModelOptions()
    if not path.is_file():
        raise CleanseError(f"{path}: no such model file; check the path")
    if path.suffix.lower() in TORCH_SUFFIXES:
        state, doc = _read_torch_file(path), None
    else:
        state, metadata = read_safetensors(path)
        doc = read_cleanse_metadata(metadata, path)
    notes: list[str] = []
    if doc is not None:
        spec = _spec_from_metadata(doc, path)
        if _is_file_arch(spec.arch) and not _same_file_arch(options.arch, spec.arch):
            raise CleanseError(f"{path}: the model's architecture is defined in {spec.arch}; pass --arch {spec.arch} to allow running that file")
        if _is_file_arch(spec.arch):
            spec.arch = options.arch  # type: ignore[assignment]  # the user's spelling of the same file
        _reconcile(spec, options, path)
    else:
        spec, notes = _spec_from_options(options, path, state)
    state = _strip_prefixes(state)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CleanseError(f"{path}: tensor {name!r} holds NaN or Inf; the checkpoint is corrupt, use another copy")
    if not _is_file_arch(spec.arch):
        # Compare shapes on the meta device first: metadata could otherwise make us allocate (and initialise) a huge
        # network, e.g. width=100000,100000,100000, before noticing the weights do not fit it.
        with torch.device("meta"):
            shell, _ = build_net(spec.arch, spec.num_classes, spec.arch_args)
        aligned, _ = _align_prefix(state, set(shell.state_dict()))
        problem = describe_mismatch(shell, aligned, spec)
        if problem:
            raise CleanseError(f"{path}: {problem}")
    net, file_sha = build_net(spec.arch, spec.num_classes, spec.arch_args)
    if spec.arch_file_sha256 and file_sha and file_sha != spec.arch_file_sha256:
        notes.append(f"warning: {spec.arch} changed since the checkpoint was saved (sha256 differs); predictions may differ")
    spec.arch_file_sha256 = file_sha or spec.arch_file_sha256
    state, prefix = _align_prefix(state, set(net.state_dict()))
    if prefix:
        notes.append(f"note: removed the prefix {prefix!r} that every key in {path.name} carries")
    problem = describe_mismatch(net, state, spec)
    if problem:
        raise CleanseError(f"{path}: {problem}")
    net.load_state_dict(state, strict=True)
    digest = sha256_file(path)
    if doc is None:
        spec.provenance = {"imported_from": str(path), "source_sha256": digest}
        spec.arch_file_sha256 = file_sha
    model = ClassifierModel(net, spec)
    model.notes = notes
    model.source_sha256 = digest
    # channels_last weights: oneDNN runs convolutions on them without a reorder per call
    # (Grad-CAM: +13% on resnet18, +32% on cnn, measured in benchmarks/gradcam_speed.py)
    return model.to(device).to(memory_format=torch.channels_last).eval()
