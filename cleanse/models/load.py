"""Loading and saving models: a cleanse checkpoint, or a raw state dict described by command-line options.

A checkpoint (safetensors: the bare network's state_dict + one `cleanse` metadata document) rebuilds
itself from its metadata, and options the user also gave must agree with it. A raw state dict
(safetensors without metadata, or `.pt`/`.pth`) needs `--arch` and `--num-classes`. Either way the
weights must fit the network exactly; when they do not, the error names the likely cause.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cleanse.errors import CleanseError
from cleanse.files import sha256_file, write_safetensors
from cleanse.models.build import build_net, is_file_arch, same_file_arch, size_args
from cleanse.models.diagnose import describe_mismatch, head_hint
from cleanse.models.spec import MODEL_FILE, PRESETS, ModelOptions, ModelSpec, parse_model_metadata
from cleanse.models.state_dict import TORCH_SUFFIXES, align_prefix, read_torch_file, strip_prefixes
from cleanse.models.wrapper import ClassifierModel


def save_model(model: ClassifierModel, path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> None:
    """Write the bare network's state_dict and the spec's metadata (with `provenance`, if given), atomically."""
    if provenance is not None:
        model.spec.provenance = provenance
    state = {k: v for k, v in model.net.state_dict().items()}
    write_safetensors(path, state, model.spec.to_metadata())


def _spec_from_options(
    options: ModelOptions, path: Path, state: dict[str, torch.Tensor]
) -> tuple[ModelSpec, list[str]]:
    """The spec of a raw state dict, from the command line; also notes naming the defaults it assumed."""
    missing = [
        flag for flag, value in (("--arch", options.arch), ("--num-classes", options.num_classes)) if value is None
    ]
    if missing:
        forms = {
            "--arch": "--arch NAME|torchvision:NAME|path/file.py:factory",
            "--num-classes": f"--num-classes N{head_hint(state)}",
        }
        raise CleanseError(
            f"{path}: raw state dict without cleanse metadata; add {' and '.join(missing)} "
            f"({', '.join(forms[flag] for flag in missing)}), and --input-size C,H,W and --preset "
            "cifar10|imagenet|none or --mean/--std when not 3,32,32 with CIFAR-10 normalisation"
        )
    assert options.arch is not None and options.num_classes is not None
    notes = []
    size = options.input_size or (3, 32, 32)
    if options.mean is None or options.std is None:
        if size[0] != 3:
            raise CleanseError(
                f"{path}: raw state dict for {size[0]}-channel inputs; add --mean and --std with {size[0]} values each"
            )
        mean, std = list(PRESETS["cifar10"][0]), list(PRESETS["cifar10"][1])
    else:
        mean, std = list(options.mean), list(options.std)
    if len(mean) != size[0] or len(std) != size[0]:
        raise CleanseError(
            f"--mean/--std have {len(mean)}/{len(std)} values but the inputs have {size[0]} channels; "
            "give one per channel"
        )
    defaults = (("--input-size 3,32,32", options.input_size), ("--preset cifar10", options.mean))
    assumed = [text for text, given in defaults if given is None]
    if assumed:
        notes.append(
            f"note: {path.name} is a raw state dict: assuming {' and '.join(assumed)} (give the option"
            f"{'s' if len(assumed) > 1 else ''} if the model expects otherwise)"
        )
    classes = options.classes or [str(i) for i in range(options.num_classes)]
    if len(classes) != options.num_classes:
        raise CleanseError(
            f"--classes names {len(classes)} classes but --num-classes is {options.num_classes}; "
            "give one name per class"
        )
    spec = ModelSpec(
        options.arch,
        options.num_classes,
        list(classes),
        (size[0], size[1], size[2]),
        mean,
        std,
        dict(options.arch_args or {}),
        preprocess=options.preprocess or "resize",
    )
    return spec, notes


def _same_args(given: dict[str, Any], stored: dict[str, Any]) -> bool:
    return {k: str(v) for k, v in given.items()} == {k: str(v) for k, v in stored.items()}


def _disagrees(given: Any, stored: Any) -> bool:
    """An option's value differs from the metadata's (lists of floats: in length or beyond float32 rounding)."""
    if not isinstance(stored, list):
        return bool(given != stored)
    return len(given) != len(stored) or not torch.allclose(
        torch.tensor(given, dtype=torch.float32), torch.tensor(stored, dtype=torch.float32)
    )


def _reconcile(spec: ModelSpec, options: ModelOptions, path: Path) -> None:
    """Explicit options must agree with the checkpoint's metadata; `--classes` may rename the classes."""
    checks = (
        ("--arch", options.arch, spec.arch),
        ("--num-classes", options.num_classes, spec.num_classes),
        ("--input-size", options.input_size and tuple(options.input_size), tuple(spec.input_size)),
        ("--mean", options.mean, spec.mean),
        ("--std", options.std, spec.std),
        ("--preprocess", options.preprocess, spec.preprocess),
    )
    for flag, given, stored in checks:
        if given is not None and _disagrees(given, stored):
            raise CleanseError(
                f"{path}: {flag} {given} disagrees with the checkpoint's metadata ({stored}); drop {flag}"
            )
    if options.arch_args and not _same_args(options.arch_args, spec.arch_args):
        raise CleanseError(
            f"{path}: --arch-arg {options.arch_args} disagrees with the checkpoint's metadata "
            f"({spec.arch_args}); drop --arch-arg"
        )
    if options.classes is not None:
        if len(options.classes) != spec.num_classes:
            raise CleanseError(f"--classes names {len(options.classes)} classes but the model has {spec.num_classes}")
        spec.classes = list(options.classes)


def _size_hint(spec: ModelSpec) -> str:
    """For a network built for its input size: '; or the input size ...', to end a weights-do-not-fit message."""
    filled = size_args(spec.arch, spec.arch_args, spec.input_size)
    if not filled:
        return ""
    given = ",".join(f"{k}={v}" for k, v in filled.items())
    c, h, w = spec.input_size
    return f"; or the wrong input size: built for {c},{h},{w} ({given}); give the weights' size with --input-size C,H,W"


def load_model(
    path: str | os.PathLike, options: ModelOptions | None = None, device: torch.device | str = "cpu"
) -> ClassifierModel:
    """Load a cleanse checkpoint or a raw state dict (.safetensors/.pt/.pth), strictly."""
    path = Path(path)
    options = options or ModelOptions()
    if not path.is_file():
        raise CleanseError(f"{path}: no such model file; check the path")
    doc: dict[str, Any] | None
    if path.suffix.lower() in TORCH_SUFFIXES:
        state, doc = read_torch_file(path), None
    else:
        state, doc = MODEL_FILE.read_or_raw(path)
    notes: list[str] = []
    if doc is not None:
        spec = parse_model_metadata(doc, path)
        if is_file_arch(spec.arch):
            if options.arch is None or not same_file_arch(options.arch, spec.arch):
                raise CleanseError(
                    f"{path}: the model's architecture is defined in {spec.arch}; "
                    f"pass --arch {spec.arch} to allow running that file"
                )
            spec.arch = options.arch  # the user's spelling of the same file
        _reconcile(spec, options, path)
    else:
        spec, notes = _spec_from_options(options, path, state)
    state = strip_prefixes(state)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CleanseError(f"{path}: tensor {name!r} holds NaN or Inf; the checkpoint is corrupt, use another copy")
    if not is_file_arch(spec.arch):
        # Compare shapes on the meta device first: metadata could otherwise make us allocate (and initialise) a huge
        # network, e.g. width=100000,100000,100000, before noticing the weights do not fit it.
        with torch.device("meta"):
            shell, _ = build_net(spec.arch, spec.num_classes, spec.arch_args, spec.input_size)
        aligned, _ = align_prefix(state, set(shell.state_dict()))
        problem = describe_mismatch(shell, aligned, spec)
        if problem:
            raise CleanseError(f"{path}: {problem}{_size_hint(spec)}")
    # the input size reaches the builder (a ViT's image_size); what it fills is derived, never stored in arch_args
    net, file_sha = build_net(spec.arch, spec.num_classes, spec.arch_args, spec.input_size)
    if spec.arch_file_sha256 and file_sha and file_sha != spec.arch_file_sha256:
        notes.append(
            f"warning: {spec.arch} changed since the checkpoint was saved (sha256 differs); predictions may differ"
        )
    spec.arch_file_sha256 = file_sha or spec.arch_file_sha256
    state, prefix = align_prefix(state, set(net.state_dict()))
    if prefix:
        notes.append(f"note: removed the prefix {prefix!r} that every key in {path.name} carries")
    problem = describe_mismatch(net, state, spec)
    if problem:
        raise CleanseError(f"{path}: {problem}{_size_hint(spec)}")
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
