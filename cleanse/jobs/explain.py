"""The explain job: Grad-CAM heatmaps (PNG) of clean and triggered images, with the Trigger Attention Ratio."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cleanse.attacks import Trigger, load_trigger
from cleanse.data import load_image_files
from cleanse.engine.gradcam import CamResult, grad_cam, normalise, tar_and_share
from cleanse.engine.layers import check_layer, default_layers
from cleanse.engine.tar import CamPair, cam_pair, tar_metrics
from cleanse.errors import CleanseError
from cleanse.files import atomic_directory, check_output_folder, write_json_atomic
from cleanse.heatmap import colorize, overlay, panel
from cleanse.jobs.inputs import RunSettings, check_classes, load_clean, load_job_model, note_data
from cleanse.jobs.progress import SILENT, Progress
from cleanse.models import ClassifierModel, ModelOptions
from cleanse.record import describe_input, new_record, versions
from cleanse.viz import image_grid, save_png


@dataclass
class ExplainOptions:
    model_path: str
    model: ModelOptions | None = None  # what a raw state dict lacks
    image_files: list[str] = field(default_factory=list)  # explain these instead of --data
    data: str | None = None
    output: Path = Path("heatmaps")
    trigger: Path | None = None
    n: int = 16
    layer: str | None = None
    target: str = "predicted"  # predicted | label | a class index
    no_cache: bool = False


@dataclass
class ExplainResult:
    doc: dict[str, Any]  # explain.json (and what --json prints)
    output: Path

    def to_json(self) -> dict[str, Any]:
        return self.doc


@dataclass
class _Images:
    images: torch.Tensor  # uint8 (N,H,W,C)
    labels: torch.Tensor | None
    names: list[str]


def _target_classes(target: str, labels: torch.Tensor | None, num_classes: int, n: int) -> torch.Tensor | None:
    if target == "predicted":
        return None
    if target == "label":
        if labels is None:
            raise CleanseError(
                "--target label needs labelled images; use --data, or --target predicted|INT for image files"
            )
        return labels
    try:
        cls = int(target)
    except ValueError:
        raise CleanseError(f"--target {target!r} must be predicted, label or a class index") from None
    if not 0 <= cls < num_classes:
        raise CleanseError(f"--target {cls} is out of range; the model has classes 0..{num_classes - 1}")
    return torch.full((n,), cls, dtype=torch.long)


def _pick_images(
    o: ExplainOptions, model: ClassifierModel, trig: Trigger | None, seed: int, progress: Progress
) -> _Images:
    """--n seeded images of --data (whose class is not the trigger's target), or the image files."""
    _, height, width = model.spec.input_size
    if not o.data:
        images, notes = load_image_files(list(o.image_files), (height, width), model.spec.preprocess)
        for note in notes:
            progress.note(f"note: {note}")
        return _Images(images, None, list(o.image_files))
    dataset, _ = load_clean(o.data, "test", o.no_cache, (height, width), model.spec.preprocess)
    check_classes(model, dataset, o.data)
    note_data(dataset, progress)
    pool = torch.arange(len(dataset))
    if trig is not None:
        pool = pool[trig.eligible(dataset.labels)]
    if o.n > len(pool):
        what = "images whose class is not the trigger's target" if trig is not None else "images"
        raise CleanseError(f"--n {o.n} is larger than the {len(pool)} {what} in {o.data}; lower --n")
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[: o.n]].sort().values
    return _Images(dataset.images[pick], dataset.labels[pick], [f"{o.data}[{int(i)}]" for i in pick])


def _num(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if v != v else v


def explain(options: ExplainOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> ExplainResult:
    o, s = options, settings or RunSettings()
    started = time.perf_counter()
    if bool(o.data) == bool(o.image_files):
        raise CleanseError("give either --data DATA or image files, not both and not neither")
    if o.n < 1:
        raise CleanseError("--n must be at least 1")
    inputs = (o.model_path, o.data if o.data and Path(o.data).exists() else None, o.trigger, *o.image_files)
    check_output_folder(o.output, force=s.force, inputs=inputs)
    dev = s.torch_device()
    model = load_job_model(o.model_path, o.model, dev, progress)
    channels, height, width = model.spec.input_size
    trig = load_trigger(o.trigger) if o.trigger else None
    if trig is not None:
        trig.check_size(channels, height, width, what="the model's inputs")
    if o.layer is not None:
        check_layer(model, o.layer, model.spec.input_size)
    picture_layer, measure_layer = (o.layer, o.layer) if o.layer else default_layers(model, model.spec.input_size)
    picked = _pick_images(o, model, trig, s.seed, progress)
    images, labels = picked.images, picked.labels
    cam_target = _target_classes(o.target, labels, model.spec.num_classes, len(images))

    set_metrics: dict[str, Any] = {}
    pair: CamPair | None = None
    if trig is None:
        clean = grad_cam(model, images.to(dev).permute(0, 3, 1, 2).float().div(255), picture_layer, cam_target)
    else:
        pair = cam_pair(model, images, trig, picture_layer, target=cam_target)
        clean = CamResult(pair.clean, pair.clean_logits, pair.clean_class)  # the pair already explains the clean images
        measured = (
            pair if measure_layer == picture_layer else cam_pair(model, images, trig, measure_layer, target=cam_target)
        )
        set_metrics = tar_metrics(measured, trig)
        region = trig.region_mask()
        tar, share = tar_and_share(measured.triggered, region) if region is not None else (None, None)
        clean_tar, _ = tar_and_share(measured.clean, region) if region is not None else (None, None)
        tprobs = pair.triggered_logits.softmax(1)
    probs = clean.logits.softmax(1)
    doc_images: list[dict[str, Any]] = []
    for i in range(len(images)):
        predicted = int(probs[i].argmax())
        entry: dict[str, Any] = {
            "source": picked.names[i],
            "label": None if labels is None else int(labels[i]),
            "label_name": None if labels is None else model.spec.classes[int(labels[i])],
            "predicted": predicted,
            "predicted_name": model.spec.classes[predicted],
            "confidence": float(probs[i].max()),
            "cam_class": int(clean.classes[i]),
        }
        if pair is not None:
            tp = int(tprobs[i].argmax())
            entry["triggered"] = {
                "predicted": tp,
                "predicted_name": model.spec.classes[tp],
                "confidence": float(tprobs[i].max()),
                "cam_class": int(pair.triggered_class[i]),
                "tar": _num(tar[i]) if tar is not None else None,
                "attention_share": _num(share[i]) if share is not None else None,
            }
            entry["clean_tar"] = _num(clean_tar[i]) if clean_tar is not None else None
        doc_images.append(entry)

    doc = {
        "model": o.model_path,
        "model_sha256": model.source_sha256,
        "layer": picture_layer,
        "tar_layer": measure_layer,
        "target": o.target,
        "trigger": str(o.trigger) if o.trigger else None,
        "images": doc_images,
        "set": dict(set_metrics) if trig is not None else None,
    }
    record = new_record(
        "explain",
        inputs={
            "model": describe_input(o.model_path),
            "data": describe_input(o.data),
            "trigger": describe_input(o.trigger),
            "images": [describe_input(p) for p in o.image_files],
        },
        parameters={
            "n": len(images),
            "layer": picture_layer,
            "tar_layer": measure_layer,
            "target": o.target,
            "seed": s.seed,
        },
        metrics=set_metrics or None,
        result="explain.json",
        versions=versions(dev),
        timings={"wall_seconds": time.perf_counter() - started},
    )
    triggered_images = trig.apply_uint8(images) if trig is not None else None
    maps = [clean.cams] + ([pair.triggered] if pair is not None else [])
    target = {"predicted": "the predicted class", "label": "the label"}.get(o.target, f"class {o.target}")
    title = f"Grad-CAM at {picture_layer} for {target}; one colour scale for the whole sheet"
    with atomic_directory(o.output, force=s.force, inputs=inputs) as folder:
        _write_pictures(folder, images, triggered_images, maps, [_captions(e) for e in doc_images], title)
        write_json_atomic(folder / "explain.json", doc)
        write_json_atomic(folder / "run.json", record)
    return ExplainResult(doc, o.output)


def _captions(entry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the pictures say about one image: its source, label and prediction; then the triggered copy's."""
    clean = [Path(entry["source"]).name]
    if entry["label_name"] is not None:
        clean.append(f"label: {entry['label_name']}")
    clean.append(f"pred: {entry['predicted_name']} {entry['confidence']:.2f}")
    trig = entry.get("triggered")
    if trig is None:
        return clean, []
    triggered = [f"triggered: {trig['predicted_name']} {trig['confidence']:.2f}"]
    if trig["tar"] is not None:
        triggered.append(f"TAR {trig['tar']:.2f}")
    return clean, triggered


def _write_pictures(
    folder: Path,
    images: torch.Tensor,
    triggered: torch.Tensor | None,
    maps: list[torch.Tensor],
    captions: list[tuple[list[str], list[str]]],
    title: str,
) -> None:
    """img-NNN.png (and -triggered) with per-image scales, and sheet.png on one scale shared by the run."""
    per_image = [normalise(m) for m in maps]
    shared = normalise(torch.cat(maps), shared=True).split(len(images))
    heads = ["image", "Grad-CAM", "overlay"]
    trig_heads = ["triggered image", "triggered Grad-CAM", "triggered overlay"]
    rows = []
    for i in range(len(images)):
        clean_text, trig_text = captions[i]
        save_png(
            panel(images[i], per_image[0][i], col_labels=heads, title=", ".join(clean_text)),
            folder / f"img-{i:03d}.png",
        )
        row = [images[i], colorize(shared[0][i : i + 1])[0], overlay(images[i : i + 1], shared[0][i : i + 1])[0]]
        if triggered is not None:
            save_png(
                panel(
                    triggered[i], per_image[1][i], col_labels=trig_heads, title=", ".join(clean_text[:1] + trig_text)
                ),
                folder / f"img-{i:03d}-triggered.png",
            )
            row += [
                triggered[i],
                colorize(shared[1][i : i + 1])[0],
                overlay(triggered[i : i + 1], shared[1][i : i + 1])[0],
            ]
        rows.append(torch.stack(row))
    sheet = image_grid(
        rows,
        scale=4,
        col_labels=heads + (trig_heads if triggered is not None else []),
        row_labels=["\n".join(c + t) for c, t in captions],
        title=title,
    )
    save_png(sheet, folder / "sheet.png")
