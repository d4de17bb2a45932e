"""`nad`: Neural Attention Distillation (Li et al., ICLR 2021; github bboylyg/NAD, main.py and at.py).

A teacher (a copy of the model fine-tuned on the clean subset) guides the student (the model itself), trained on

    L = CE(f_s(x), y) + sum_i beta_i * MSE(A(a_s^i), A(a_t^i))

where a^i is the feature map (B, C, h, w) of layer i and A its attention map: the sum over channels of |a|^p,
divided by its L2 norm over the grid (+ 1e-6). The layers are the deepest block output at each of the model's
grid sizes, the deepest three of those (the WRN's three groups in the official code), with the official betas
500, 1000, 1000 from shallow to deep; a model with fewer grid sizes uses the deepest betas. Token and channels-last
maps are read on their grid (cleanse/engine/layers.py).

The MSE of two L2-normalised maps is their squared distance divided by the grid's h x w cells, so the same betas
weigh a coarse grid more than a fine one. The official betas were set on a WRN-16 at 32 px, whose three maps have
32x32, 16x16 and 8x8 cells; with `scale_by_grid` each beta is multiplied by the layer's cells over the official
layer's (`OFFICIAL_CELLS`), which gives the official weight to the same distance on any grid (ours: the `cnn`'s
15x15, 7x7 and 3x3 maps take the official betas 4.6-7.1 times as hard; on CIFAR-10 its held-back accuracy fell from
96% to 14% at lr 0.1, or to 53% at lr 0.01, in the first distillation epoch).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.engine.device import autocast
from cleanse.engine.layers import LayerInfo, Layout, candidates, first_tensor, probe_layers
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.recipes.base import Param, Recipe, RecipeContext, RecipeResult, RecipeRun, batches, register, trainable

NO_MAPS = (
    "nad distils attention maps of feature maps, and this model has no block output on a grid over the image; "
    "use --method finetune or fine-prune"
)


OFFICIAL_CELLS = (32 * 32, 16 * 16, 8 * 8)  # the official WRN-16's three maps on 32x32 CIFAR-10, shallow to deep


def layer_weights(betas: list[float], grids: list[tuple[int, int]], scale_by_grid: bool) -> list[float]:
    """Each layer's weight on its attention loss: its beta (the deepest betas when there are fewer layers), times
    its grid's cells over the official layer's with `scale_by_grid`."""
    betas, reference = betas[-len(grids) :], OFFICIAL_CELLS[-len(grids) :]
    if not scale_by_grid:
        return list(betas)
    return [b * h * w / ref for b, (h, w), ref in zip(betas, grids, reference, strict=True)]


def attention_map(fm: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """sum_c |a|^p of a (B, C, h, w) map, divided by its L2 norm over the grid (+ eps): (B, 1, h, w)."""
    am = fm.float().abs().pow(p).sum(1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """MSE between the attention maps of the student's and the (detached) teacher's feature maps."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher.detach(), p))


def pick_layers(infos: list[LayerInfo], count: int) -> list[LayerInfo]:
    """The deepest block output (else layer) at each grid size, the deepest `count` of them, shallow first."""
    found = candidates(infos)
    pool = [i for i in found if i.block] or found
    deepest: dict[tuple[int, int], LayerInfo] = {}
    for info in pool:
        deepest.pop(info.grid, None)
        deepest[info.grid] = info  # re-inserted: the dict ends in the order of each grid's deepest layer
    return list(deepest.values())[-count:]


class Maps:
    """The feature maps of the chosen layers, in (B, C, h, w), captured by forward hooks on one model."""

    def __init__(self, net: nn.Module, layers: list[LayerInfo]) -> None:
        modules = dict(net.named_modules())
        self.layouts: list[Layout] = [i.layout for i in layers]
        self.out: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [modules[i.name].register_forward_hook(self._hook(k)) for k, i in enumerate(layers)]

    def _hook(self, k: int) -> Any:
        def hook(module: nn.Module, args: object, out: object) -> None:
            t = first_tensor(out)
            self.out[k] = None if t is None else self.layouts[k].to_map(t)

        return hook

    def taken(self) -> list[torch.Tensor]:
        maps = [m for m in self.out if m is not None]
        assert len(maps) == len(self.out), "a chosen layer was not called in the forward pass"
        return maps

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@register
class Nad(Recipe):
    name = "nad"
    summary = (
        "fine-tune a teacher on the clean subset, then distil its attention maps into the model (trigger-agnostic)"
    )
    params = {
        "epochs": Param(20, "student (distillation) passes over the clean subset"),
        "teacher_epochs": Param(10, "teacher fine-tuning passes over the clean subset"),
        "lr": Param(
            0.01,
            "SGD learning rate (momentum 0.9, Nesterov) for the first lr_drop_epoch epochs (BackdoorBench's CIFAR-10 "
            "setting; the official 0.1 wrecks a trained cnn)",
        ),
        "lr_drop_epoch": Param(2, "from this epoch on (counting from 0) the learning rate is lr / 10"),
        "weight_decay": Param(1e-4, "SGD weight decay"),
        "batch_size": Param(64, "batch size"),
        "beta1": Param(500.0, "attention loss weight of the shallowest layer"),
        "beta2": Param(1000.0, "attention loss weight of the middle layer"),
        "beta3": Param(1000.0, "attention loss weight of the deepest layer"),
        "p": Param(2.0, "power of |a| in the attention map"),
        "scale_by_grid": Param(
            True,
            "multiply each beta by its layer's grid cells over the official WRN layer's (32x32, 16x16, 8x8)",
            changed_default_when_added=True,
        ),
        "ca_margin": Param(0.02, "kept state: the latest epoch whose held-back CA is within this of the best epoch's"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        self._layers(model)

    @staticmethod
    def _layers(model: ClassifierModel) -> list[LayerInfo]:
        layers = pick_layers(probe_layers(model, model.spec.input_size), 3)
        if not layers:
            raise CleanseError(NO_MAPS)
        return layers

    def run(self, ctx: RecipeContext) -> RecipeResult:
        layers = self._layers(ctx.model)
        run = RecipeRun.begin(self, ctx)
        p = ctx.params
        betas = [p["beta1"], p["beta2"], p["beta3"]][-len(layers) :]
        weights = layer_weights(betas, [i.grid for i in layers], p["scale_by_grid"])
        run.result.extra["layers"] = {
            i.name: {"beta": b, "grid": list(i.grid), "weight": round(w, 4)}
            for i, b, w in zip(layers, betas, weights, strict=True)
        }
        teacher = copy.deepcopy(ctx.model)
        self._train(run, teacher, p["teacher_epochs"], "teacher")
        teacher.eval()
        for q in teacher.net.parameters():
            q.requires_grad_(False)
        student_maps, teacher_maps = Maps(ctx.model.net, layers), Maps(teacher.net, layers)
        try:
            self._train(run, ctx.model, p["epochs"], "distil", (teacher, student_maps, teacher_maps, weights))
        finally:
            student_maps.close()
            teacher_maps.close()
        return run.finish()

    def _train(
        self,
        run: RecipeRun,
        model: ClassifierModel,
        epochs: int,
        phase: str,
        distil: tuple[ClassifierModel, Maps, Maps, list[float]] | None = None,
    ) -> None:
        """Fine-tune `model` (the teacher, distil None) or distil the teacher's attention into the student."""
        ctx, p = run.ctx, run.ctx.params
        optimizer = torch.optim.SGD(
            trainable(model), lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"], nesterov=True
        )
        for epoch in range(1, epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = p["lr"] if epoch - 1 < p["lr_drop_epoch"] else p["lr"] / 10
            model.train()
            ce_sum = torch.zeros((), device=ctx.device)
            at_sum = torch.zeros((), device=ctx.device)
            seen = 0
            for x, y, _ in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device):
                with autocast(ctx.device, ctx.precision):
                    ce = F.cross_entropy(model(x).float(), y)
                    at = torch.zeros((), device=ctx.device)
                    if distil is not None:
                        teacher, student_maps, teacher_maps, weights = distil
                        with torch.no_grad():
                            teacher(x)
                        pairs = zip(student_maps.taken(), teacher_maps.taken(), weights, strict=True)
                        at = sum((b * attention_loss(s, t, p["p"]) for s, t, b in pairs), at)
                loss = ce + at
                if distil is not None and run.diverged(loss):
                    return
                run.step(optimizer, loss)
                ce_sum += ce.detach() * len(y)
                at_sum += at.detach() * len(y)
                seen += len(y)
            n = max(1, seen)
            if distil is None:
                model.eval()
                run.row(phase, epoch, clean_ce=float(ce_sum) / n, **run.monitor(model), detail="teacher")
                continue
            metrics = run.measure()
            run.row(phase, epoch, loss=float(ce_sum + at_sum) / n, clean_ce=float(ce_sum) / n, **metrics)
            if run.judge(metrics, f"distil epoch {epoch}"):
                return
