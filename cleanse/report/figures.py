"""The report's pictures: history plots, the scan's anomaly bars, and before/after Grad-CAM sheets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cleanse.attacks.trigger import Trigger
from cleanse.data.dataset import Dataset
from cleanse.engine.gradcam import normalise
from cleanse.engine.layers import default_layer
from cleanse.engine.tar import cam_pair
from cleanse.heatmap import colorize, overlay
from cleanse.models import ClassifierModel
from cleanse.viz import image_grid, save_png


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def history_plot(series: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """CA, ASR and TAR (held back) against elapsed seconds, one line per recipe. False when there is nothing to plot."""
    if not any(series.values()):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    keys = ("clean_accuracy", "attack_success_rate", "tar")
    for ax, key, title in zip(axes, keys, ("held-back CA", "held-back ASR", "held-back TAR"), strict=True):
        for name, rows in series.items():
            pts = [(r["elapsed"], r[key]) for r in rows if r.get(key) is not None and r.get("elapsed") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        if key != "tar":
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def anomaly_plot(
    classes: list[dict[str, Any]], threshold: float, path: Path, detector: str = "patch", size: str = "mask_l1"
) -> None:
    """Anomaly index per class, drawn negative for triggers smaller than the median (the side that gets flagged)."""
    plt = _pyplot()
    norms = sorted(c["statistic"] for c in classes)
    median = (norms[(len(norms) - 1) // 2] + norms[len(norms) // 2]) / 2
    fig, ax = plt.subplots(figsize=(8, 3.4))
    xs = [f"{c['index']} {c['name']}" for c in classes]
    colours = ["#c0392b" if c.get("flagged") else "#7f8c8d" for c in classes]
    ax.bar(xs, [c["score"] * (-1 if c["statistic"] < median else 1) for c in classes], color=colours)
    ax.axhline(-threshold, color="#2c3e50", linestyle="--", linewidth=1, label=f"flag below -{threshold:g}")
    ax.axhline(0, color="#2c3e50", linewidth=0.6)
    ax.set_ylabel("anomaly index (signed)")
    ax.set_title(
        f"scan, {detector} detector: anomaly index of each class's reversed-trigger size ({size}; "
        "negative = smaller than median; red = flagged)",
        fontsize=9,
    )
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def before_after_sheet(
    before: ClassifierModel,
    after: ClassifierModel,
    data: Dataset,
    trigger: Trigger | None,
    n: int,
    path: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Grad-CAM of the same images under both models, one colour scale for the whole sheet.

    Columns: image | before | after, then (with a trigger) triggered image | before | after; each row is labelled
    with its data row, class and the predictions of both models.
    """
    pool = torch.arange(len(data))
    if trigger is not None:
        pool = pool[trigger.eligible(data.labels)]
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
    images = data.images[pick]
    maps, triggered_images, preds = [], None, {}
    for tag, model in (("before", before), ("after", after)):
        layer = default_layer(model, model.spec.input_size)
        if trigger is not None:
            pair = cam_pair(model, images, trigger, layer)
            maps += [pair.clean, pair.triggered]
            preds[tag] = {
                "clean": pair.clean_logits.argmax(1).tolist(),
                "triggered": pair.triggered_logits.argmax(1).tolist(),
            }
            triggered_images = trigger.apply_uint8(images)
        else:
            from cleanse.engine.gradcam import grad_cam

            result = grad_cam(model, images.to(model.device).permute(0, 3, 1, 2).float().div(255), layer)
            maps.append(result.cams)
            preds[tag] = {"clean": result.logits.argmax(1).tolist()}
    shared = normalise(torch.cat(maps), shared=True).split(len(images))
    columns = ["image", "before", "after"]
    if triggered_images is not None:
        columns += ["triggered image", "before (triggered)", "after (triggered)"]
    rows = []
    for i in range(len(images)):
        if triggered_images is not None:
            b_clean, b_trig, a_clean, a_trig = (s[i : i + 1] for s in shared)
            row = [
                images[i],
                overlay(images[i : i + 1], b_clean)[0],
                overlay(images[i : i + 1], a_clean)[0],
                triggered_images[i],
                overlay(triggered_images[i : i + 1], b_trig)[0],
                overlay(triggered_images[i : i + 1], a_trig)[0],
            ]
        else:
            b_clean, a_clean = (s[i : i + 1] for s in shared)
            row = [images[i], colorize(b_clean)[0], colorize(a_clean)[0]]
        rows.append(torch.stack(row))
    labels = data.labels[pick].tolist()
    names = before.spec.classes
    row_labels = []
    for i, r in enumerate(pick.tolist()):
        lines = [f"row {r}: {data.classes[labels[i]]}", "pred. before -> after"]
        for kind in preds["before"]:  # clean, and triggered with a trigger
            lines.append(f"{kind}: {names[preds['before'][kind][i]]} -> {names[preds['after'][kind][i]]}")
        row_labels.append("\n".join(lines))
    kind = "overlays" if triggered_images is not None else "heatmaps"
    title = f"Grad-CAM {kind} under the model before and after cleaning; one colour scale for the whole sheet"
    save_png(image_grid(rows, scale=4, col_labels=columns, row_labels=row_labels, title=title), path)
    return {
        "rows": [
            {"row": int(r), "label": labels[i], **{tag: {k: v[i] for k, v in p.items()} for tag, p in preds.items()}}
            for i, r in enumerate(pick.tolist())
        ],
        "columns": columns,
    }
