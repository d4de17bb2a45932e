"""`finetune`: plain fine-tuning on the clean subset, the baseline every method must beat."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cleanse.engine.device import autocast
from cleanse.engine.events import Event
from cleanse.recipes.base import (Param, Recipe, RecipeContext, RecipeResult, batches, cosine_lr,
                                  register, steps_per_pass, trainable)
from cleanse.recipes.resume import capture, restore


@register
class FineTune(Recipe):
    name = "finetune"
    summary = "plain fine-tuning on the clean subset (baseline; trigger used for monitoring only)"
    resumable = True
    params = {
        "epochs": Param(10, "passes over the clean subset"),
        "lr": Param(0.01, "SGD learning rate (momentum 0.9, cosine schedule)"),
        "weight_decay": Param(5e-4, "SGD weight decay"),
        "batch_size": Param(128, "batch size"),
        "ca_margin": Param(0.02, "kept state: the latest epoch whose held-back CA is within this of the best epoch's"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def run(self, ctx: RecipeContext) -> RecipeResult:
        opening = self.begin(ctx)
        monitor, keeper, result, began = opening.monitor, opening.keeper, opening.result, opening.began
        p, model = ctx.params, ctx.model
        optimizer = torch.optim.SGD(trainable(model), lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"], nesterov=True)
        gen = torch.Generator().manual_seed(ctx.seed)
        steps_per_epoch = steps_per_pass(len(ctx.split.train), p["batch_size"])
        total, step, first = p["epochs"] * steps_per_epoch, 0, 1
        if ctx.checkpoints.resume is not None:
            state = ctx.checkpoints.resume
            restore(state, model, optimizer, gen, keeper, result)
            step, first, began = state.position["step"], state.position["epoch"] + 1, began - state.doc["elapsed"]
        for epoch in range(first, p["epochs"] + 1):
            model.train()
            loss_sum, seen = 0.0, 0
            for x, y, _ in batches(ctx.split.train, p["batch_size"], gen, ctx.device):
                cosine_lr(optimizer, p["lr"], step, total)
                with autocast(ctx.device, ctx.precision):
                    loss = F.cross_entropy(model(x).float(), y)
                if keeper.tripped(loss=float(loss.detach())):
                    keeper.rollback(model, keeper.tripped(loss=float(loss.detach())), ctx)  # type: ignore[arg-type]
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum, seen = loss_sum + float(loss.detach()) * len(y), seen + len(y)
            model.eval()
            metrics = monitor(model)
            row = {"phase": "finetune", "epoch": epoch, "loss": loss_sum / max(1, seen), **metrics,
                   "elapsed": time.perf_counter() - began}
            result.history.append(row)
            ctx.callback(Event("row", row))
            keeper.offer(model, metrics, f"epoch {epoch}")
            reason = keeper.tripped(metrics)
            if reason:
                keeper.rollback(model, reason, ctx)
                break
            ctx.checkpoints.passed(lambda n: capture(self.name, n, {"epoch": epoch, "step": step}, model, optimizer, gen,  # noqa: B023
                                                     keeper, result, time.perf_counter() - began))
        result.kept = keeper.restore_best(model)
        return result
