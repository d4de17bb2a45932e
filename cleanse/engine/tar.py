"""Set-level Trigger Attention Ratio: what `explain`, `unlearn`'s monitor and run records report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cleanse.attacks.trigger import Trigger
from cleanse.engine.evaluate import eval_batch
from cleanse.engine.gradcam import cam_shift, grad_cam, summarise, tar_and_share

CAM_BATCH = 128  # images per Grad-CAM forward at 32x32 and 64x64; larger inputs take eval_batch's (20 at 224x224)


@dataclass
class CamPair:
    """Grad-CAM maps of clean images and their triggered copies, with the model's predictions."""

    clean: torch.Tensor
    triggered: torch.Tensor
    clean_logits: torch.Tensor
    triggered_logits: torch.Tensor
    clean_class: torch.Tensor
    triggered_class: torch.Tensor


def cam_pair(
    model: nn.Module,
    images: torch.Tensor,
    trigger: Trigger,
    layer: str,
    batch_size: int | None = None,
    target: torch.Tensor | None = None,
    with_clean: bool = True,
) -> CamPair:
    """Maps for uint8 (N,H,W,C) images and their triggered copies (uint8 trigger application, as `poison`), computed
    `batch_size` images at a time (None: CAM_BATCH, fewer for large images, so that a forward's activations stay near
    an eval forward's; each image's map does not depend on the batch).

    Without `with_clean` only the triggered copies are explained (the clean fields are empty):
    half the cost, for monitors that need TAR every epoch but the clean baseline only once.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or min(CAM_BATCH, eval_batch(images))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("c", "t", "cl", "tl", "cc", "tc")}
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        tgt = None if target is None else target[sl]
        triggered = trigger.apply_uint8(images[sl])  # a batch at a time: the triggered set is never held whole
        batches = (("c", images[sl]), ("t", triggered)) if with_clean else (("t", triggered),)
        for key, batch in batches:
            x = batch.to(device).permute(0, 3, 1, 2).float().div_(255)
            res = grad_cam(model, x, layer, tgt)
            parts[key].append(res.cams)
            parts[key + "l"].append(res.logits)
            parts[key + "c"].append(res.classes)
    cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    return CamPair(cat["c"], cat["t"], cat["cl"], cat["tl"], cat["cc"], cat["tc"])


def tar_metrics(pair: CamPair, trigger: Trigger) -> dict[str, Any]:
    """TAR, its median, attention share and clean TAR (or cam_shift for full-image triggers)."""
    region = trigger.region_mask()
    out: dict[str, Any] = {
        "tar": None,
        "tar_median": None,
        "attention_share": None,
        "clean_tar": None,
        "tar_nulls": None,
        "cam_shift": None,
    }
    usable = region is not None and 0 < int(region.sum()) <= region.numel() / 2
    has_clean = len(pair.clean) > 0
    if usable:
        tar, share = tar_and_share(pair.triggered, region)  # type: ignore[arg-type]
        t, s = summarise(tar), summarise(share)
        out.update({"tar": t["mean"], "tar_median": t["median"], "attention_share": s["mean"], "tar_nulls": t["nulls"]})
        if has_clean:
            out["clean_tar"] = summarise(tar_and_share(pair.clean, region)[0])["mean"]  # type: ignore[arg-type]
    elif has_clean:
        out["cam_shift"] = summarise(cam_shift(pair.clean, pair.triggered))["mean"]
    return out


def measure_tar(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, layer: str, with_clean: bool = True
) -> dict[str, Any]:
    """Set TAR over triggered images whose true class is not the target (predicted class, raw logit)."""
    keep = trigger.eligible(labels)
    result = tar_metrics(cam_pair(model, images[keep], trigger, layer, with_clean=with_clean), trigger)
    result["layer"] = layer
    result["n"] = int(keep.sum())
    return result
