"""Model checkpoints: bare state_dict tensors + one `cleanse` JSON metadata document.

The model wrapper applies the checkpoint's mean/std inside `forward`, so every
engine function feeds it float images in [0, 1] (pixel space). Saved
state_dicts are the bare architecture's, without the wrapper prefix.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanse import __version__
from cleanse.errors import CleanseError
from cleanse.files import read_cleanse_metadata, read_safetensors, sha256_file, write_safetensors
from cleanse.models.registry import ARCHITECTURES

MODEL_FORMAT = "cleanse.model"
FORMAT_VERSION = 1
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
TORCHVISION_PREFIX = "torchvision:"


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


def build_net(arch: str, num_classes: int, arch_args: dict[str, Any] | None = None) -> tuple[nn.Module, str | None]:
    """Build the bare network for `arch`: a registry name, torchvision:NAME or file.py:factory."""
    arch_args = dict(arch_args or {})
    file_sha = None
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch[len(TORCHVISION_PREFIX):]
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise CleanseError(f"unknown torchvision classification model {name!r}; e.g. torchvision:resnet18, torchvision:mobilenet_v3_small")
        if arch_args:
            raise CleanseError(f"torchvision architectures take no extra arguments (got {sorted(arch_args)}); weights are never downloaded")
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    elif _is_file_arch(arch):
        factory, file_sha = _load_factory(arch)
        try:
            net = factory(num_classes=num_classes, **arch_args)
        except Exception as exc:
            raise CleanseError(f"{arch} failed to build the model ({type(exc).__name__}: {exc}); the factory must accept num_classes") from None
        if not isinstance(net, nn.Module):
            raise CleanseError(f"{arch} returned {type(net).__name__}, not a torch.nn.Module")
    else:
        factory = ARCHITECTURES.get(arch)
        allowed = set(inspect.signature(factory).parameters) - {"num_classes"}
        bad = [k for k, v in arch_args.items() if k not in allowed or not isinstance(v, (str, int, float, bool))]
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

def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CleanseError(f"{path}: refused to load: not a plain state dict of tensors (weights_only: {first[:160]}); save model.state_dict() or convert to safetensors") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CleanseError(f"{path}: does not hold a state dict of tensors (or one under 'state_dict'/'model'); save model.state_dict()")
    return obj


def _check_list(value: Any, kind: type, length: int | None, what: str, path: Path) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value) or (length is not None and len(value) != length):
        raise CleanseError(f"{path}: metadata {what} is malformed; re-create the checkpoint with cleanse")
    return value


def _spec_from_metadata(doc: dict[str, Any], path: Path) -> ModelSpec:
    if doc.get("format") != MODEL_FORMAT:
        raise CleanseError(f"{path}: this is a {doc.get('format', 'unknown')!s} file, not a model checkpoint; pass a model file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CleanseError(f"{path}: checkpoint format version {doc.get('format_version')!r} is not supported (this cleanse reads {FORMAT_VERSION})")
    arch = doc.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("args", {}), dict):
        raise CleanseError(f"{path}: metadata 'arch' must be {{'name': str, 'args': {{...}}}}; re-create the checkpoint with cleanse")
    num_classes = doc.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CleanseError(f"{path}: metadata 'num_classes' must be a positive integer; re-create the checkpoint with cleanse")
    size = _check_list(doc.get("input_size"), int, 3, "'input_size'", path)
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


def _spec_from_options(options: ModelOptions, path: Path) -> ModelSpec:
    missing = [flag for flag, value in (("--arch", options.arch), ("--num-classes", options.num_classes)) if value is None]
    if missing:
        raise CleanseError(f"{path}: raw state dict without cleanse metadata; add {' and '.join(missing)} (and --preset/--mean/--std, --input-size if not CIFAR-like)")
    size = options.input_size or (3, 32, 32)
    mean = options.mean if options.mean is not None else list(PRESETS["cifar10"][0])
    std = options.std if options.std is not None else list(PRESETS["cifar10"][1])
    assert options.arch is not None and options.num_classes is not None
    classes = options.classes or [str(i) for i in range(options.num_classes)]
    return ModelSpec(options.arch, options.num_classes, list(classes), tuple(size), list(mean), list(std))


def _reconcile(spec: ModelSpec, options: ModelOptions, path: Path) -> None:
    checks = (("--arch", options.arch, spec.arch), ("--num-classes", options.num_classes, spec.num_classes),
              ("--input-size", options.input_size and tuple(options.input_size), tuple(spec.input_size)),
              ("--mean", options.mean, spec.mean), ("--std", options.std, spec.std))
    for flag, given, stored in checks:
        if given is not None and (given != stored if not isinstance(stored, list) else not torch.allclose(torch.tensor(given, dtype=torch.float32), torch.tensor(stored, dtype=torch.float32))):
            raise CleanseError(f"{path}: {flag} {given} disagrees with the checkpoint's metadata ({stored}); drop {flag}")
    if options.classes is not None:
        if len(options.classes) != spec.num_classes:
            raise CleanseError(f"--classes names {len(options.classes)} classes but the model has {spec.num_classes}")
        spec.classes = list(options.classes)


def describe_mismatch(net: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec) -> str | None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({len(missing)})")
    if unexpected:
        parts.append(f"unexpected keys {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)})")
    if shapes:
        parts.append(f"shape mismatches {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''} ({len(shapes)})")
    head_only = not missing and not unexpected and all(state[k].shape[0] != v.shape[0] and v.dim() >= 1 and v.shape[0] == spec.num_classes
                                                      for k, v in expected.items() if k in state and state[k].shape != v.shape)
    cause = f"wrong class count (--num-classes {spec.num_classes})" if head_only else f"wrong architecture (--arch {spec.arch})"
    return f"weights do not fit {spec.arch}: {'; '.join(parts)}; likely cause: {cause}"


def load_model(path: str | Path, options: ModelOptions | None = None, device: torch.device | str = "cpu") -> ClassifierModel:
    """Load a cleanse checkpoint or a raw state dict (.safetensors/.pt/.pth), strictly."""
    path = Path(path)
    options = options or ModelOptions()
    if not path.is_file():
        raise CleanseError(f"{path}: no such model file; check the path")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
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
        spec = _spec_from_options(options, path)
    state = _strip_prefixes(state)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CleanseError(f"{path}: tensor {name!r} holds NaN or Inf; the checkpoint is corrupt, use another copy")
    net, file_sha = build_net(spec.arch, spec.num_classes, spec.arch_args)
    if spec.arch_file_sha256 and file_sha and file_sha != spec.arch_file_sha256:
        notes.append(f"warning: {spec.arch} changed since the checkpoint was saved (sha256 differs); predictions may differ")
    spec.arch_file_sha256 = file_sha or spec.arch_file_sha256
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
