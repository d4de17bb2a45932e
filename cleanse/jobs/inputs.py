"""What every job does with its inputs: run settings, loading a model or clean data, and checking they fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cleanse.data import Dataset, load_data
from cleanse.engine.device import resolve_device
from cleanse.engine.distributed import join, launched
from cleanse.engine.layers import check_layer, find_tar_layer
from cleanse.errors import CleanseError
from cleanse.jobs.progress import Progress
from cleanse.models import ClassifierModel, ModelOptions, load_model

ONE_PROCESS = (
    "this command runs in one process: start it without torchrun (train, unlearn and scan split their work over ranks)"
)


@dataclass
class RunSettings:
    """The settings every job takes: the CLI's --device, --seed and --force."""

    device: str = "auto"
    seed: int = 0
    force: bool = False

    def torch_device(self) -> torch.device:
        """The job's device, for a job that runs in one process: under torchrun it refuses, rather than run the whole
        job once per rank with every rank writing the same files."""
        if launched():
            raise CleanseError(ONE_PROCESS)
        return resolve_device(self.device)

    def rank_device(self) -> torch.device:
        """The job's device for a job that splits its work over torchrun's ranks: this rank's device (cuda:LOCAL_RANK
        for --device auto or cuda), after joining the process group; one process: as torch_device."""
        return join(resolve_device(self.device))


def load_job_model(
    path: str, options: ModelOptions | None, device: torch.device, progress: Progress
) -> ClassifierModel:
    """MODEL as every job loads it: a cleanse checkpoint, or a raw state dict plus `options`; loading notes are passed
    on."""
    model = load_model(path, options, device)
    for note in model.notes:
        progress.note(note)
    return model


def tar_layer_for(model: ClassifierModel, given: str | None, progress: Progress) -> str | None:
    """The layer TAR is measured at: --layer (checked before any work) or the model's TAR layer; None, with a note,
    when the model has no feature map Grad-CAM can use (TAR is then reported as null)."""
    if given is not None:
        check_layer(model, given, model.spec.input_size)
        return given
    found = find_tar_layer(model, model.spec.input_size)
    if found is None:
        progress.note(
            "TAR is not measured: the model has no feature map Grad-CAM can use (conv map, channels-last map or "
            "token grid); pass --layer NAME to choose one"
        )
    return found


def load_clean(
    spec: str, split: str, no_cache: bool, size: tuple[int, int] | None = None, preprocess: str = "resize"
) -> tuple[Dataset, int]:
    """Load evaluation data with rows marked poisoned/noise dropped; returns (data, dropped count). Images not of
    `size` are fitted to it by `preprocess` (pass the model's `spec.preprocess`)."""
    data = load_data(spec, split=split, cache=not no_cache, image_size=size, preprocess=preprocess)
    bad = data.suspicious_mask()
    if bad.any():
        data = data.subset((~bad).nonzero().flatten())
    return data, int(bad.sum())


def check_classes(model: ClassifierModel, data: Dataset, what: str) -> None:
    """DATA fits the model: the same class count and channel count (image sizes are checked or resized by the
    caller)."""
    if data.num_classes != model.spec.num_classes:
        raise CleanseError(
            f"{what} has {data.num_classes} classes but the model has {model.spec.num_classes}; "
            "use data with the model's classes"
        )
    if data.channels != model.spec.input_size[0]:
        raise CleanseError(
            f"{what} has {data.channels}-channel images but the model takes {model.spec.input_size[0]} channels; "
            "use data with the model's channels"
        )


def check_trainable(data: Dataset, what: str) -> None:
    """Training data needs at least two classes and at least one image of every class."""
    if data.num_classes < 2:
        raise CleanseError(f"{what} has only one class ({data.classes[0]}); a classifier needs at least 2 classes")
    counts = data.labels.bincount(minlength=data.num_classes)
    empty = [i for i, c in enumerate(counts.tolist()) if c == 0]
    if empty:
        more = f" and {len(empty) - 1} more classes" if len(empty) > 1 else ""
        raise CleanseError(
            f"{what} has no images of class {empty[0]} ({data.classes[empty[0]]}){more}; "
            "add images of it or remove its class folder"
        )


def note_data(data: Dataset, progress: Progress) -> None:
    for note in data.notes:
        progress.note(f"note: {note}")


def resume_path(output: Path) -> Path:
    """Where `--checkpoint-every` keeps the resumable state of a run writing `output`."""
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{stem}.resume.safetensors")


def check_same_run(
    saved: dict[str, Any], facts: dict[str, Any], flags: tuple[tuple[str, str], ...], path: Path
) -> None:
    """The checkpoint belongs to this command line: the same inputs (by sha256) and options, named by `flags`."""
    for key, flag in flags:
        if saved.get(key) != facts[key]:
            raise CleanseError(
                f"{path}: the checkpoint was written for another {flag} ({_describe(saved.get(key))} vs "
                f"{_describe(facts[key])}); rerun with the interrupted run's options, or without --resume"
            )


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "path" in value:
        return str(value["path"]) + (f" sha256 {value['sha256'][:12]}" if value.get("sha256") else "")
    return str(value)


def check_resume_file(state_path: Path, checkpoint_every: int | None, resume: bool, force: bool) -> None:
    """--resume needs the checkpoint; --checkpoint-every must not silently replace one of an interrupted run."""
    if resume and not state_path.is_file():
        raise CleanseError(
            f"{state_path}: no checkpoint to resume from; run without --resume (with --checkpoint-every N to write one)"
        )
    if not resume and checkpoint_every is not None and state_path.exists() and not force:
        raise CleanseError(
            f"{state_path}: a checkpoint of an interrupted run exists; pass --resume to continue it, "
            "or --force to start over"
        )


def open_resume_file(state_path: Path, checkpoint_every: int | None, resuming: bool, progress: Progress) -> bool:
    """Whether this run keeps a resume checkpoint; if so, name it for an interruption's message. A fresh run first
    removes a stale checkpoint of another run (--force), so that it is never offered for --resume."""
    if not checkpoint_every and not resuming:
        return False
    if not resuming:
        state_path.unlink(missing_ok=True)
    progress.resumable(state_path)
    return True


def close_resume_file(state_path: Path, resumable: bool, progress: Progress) -> None:
    """The run is complete: its checkpoint is no longer needed."""
    if resumable:
        progress.resumable(None)
        state_path.unlink(missing_ok=True)
