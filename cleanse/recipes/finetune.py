"""`finetune`: plain fine-tuning on the clean subset, the baseline every method must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    cosine_lr,
    register,
    steps_per_pass,
    trainable,
)


@register
class FineTune(Recipe):
    name = "finetune"
    summary = "plain fine-tuning on the clean subset (baseline; trigger used for monitoring only)"
    resumable = True
    data_parallel = True
    steps_in_pieces = True
    params = {
        "epochs": Param(10, "passes over the clean subset"),
        "lr": Param(0.01, "SGD learning rate (momentum 0.9, cosine schedule)"),
        "weight_decay": Param(5e-4, "SGD weight decay"),
        "batch_size": Param(128, "batch size"),
        "ca_margin": Param(0.02, "kept state: the latest epoch whose held-back CA is within this of the best epoch's"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def run(self, ctx: RecipeContext) -> RecipeResult:
        run = RecipeRun.begin(self, ctx)
        p, model = ctx.params, ctx.model
        optimizer = torch.optim.SGD(
            trainable(model), lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"], nesterov=True
        )
        total = p["epochs"] * steps_per_pass(len(ctx.clean.train), p["batch_size"])
        step, first = 0, 1
        if run.resuming():
            at = run.restore(optimizer).position
            step, first = at["step"], at["epoch"] + 1
        for epoch in range(first, p["epochs"] + 1):
            model.train()
            loss_sum, seen = torch.zeros((), device=ctx.device), 0
            for x, y, idx in run.batches(ctx.clean.train, p["batch_size"]):
                cosine_lr(optimizer, p["lr"], step, total)
                stepped = run.step_pieces(optimizer, x, y, idx, lambda x, y, _: (F.cross_entropy(model(x).float(), y),))
                if stepped is None:
                    break  # the loss was not finite: the epoch ends at the state kept so far
                (loss,) = stepped  # under torchrun: the global batch's loss
                step += 1
                loss_sum, seen = loss_sum + loss.detach() * len(run.batch_rows), seen + len(run.batch_rows)
            metrics = run.measure()
            run.row("finetune", epoch, loss=float(loss_sum) / max(1, seen), **metrics)
            if run.judge(metrics, f"epoch {epoch}"):
                break
            run.passed({"epoch": epoch, "step": step}, optimizer)
        return run.finish()
