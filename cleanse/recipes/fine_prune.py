"""`fine-prune`: Fine-Pruning (Liu et al., RAID 2018), as BackdoorBench's defense/fp.py runs it.

The features the classifier head reads (the pooled channels of the last conv layer on a CNN, the class token on a
ViT) are ranked by their mean activation over the clean training images, lowest first: a backdoor tends to live in
units that clean data leaves dormant. They are pruned in that order, `step_ratio` of them at a time, by zeroing the
head's weight columns that read them, while the held-back CA stays within a relative `acc_ratio` of the start
((CA_0 - CA_k) / CA_0 < acc_ratio); the last count within it is kept. Then the pruned model is fine-tuned on the
clean subset with the pruned columns held at zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.data.dataset import Dataset
from cleanse.engine.device import autocast
from cleanse.engine.evaluate import evaluate
from cleanse.engine.features import penultimate
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.models.layers import class_head
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    batches,
    cosine_lr,
    register,
    steps_per_pass,
    trainable,
)

NOT_FLAT = (
    "fine-prune prunes the features the classifier head reads, and this model's head reads a {dim}-D input, not "
    "(batch, features); use --method finetune or nad"
)


def mean_head_input(model: ClassifierModel, head: nn.Linear, data: Dataset, batch_size: int = 256) -> torch.Tensor:
    """Mean over `data` of each feature the head reads (eval mode, no augmentation), float32 (features,)."""
    features = penultimate(model, data.images, model.spec.num_classes, head=head, batch_size=batch_size)
    return features.sum(0) / max(1, len(data))


def pruning_order(activation: torch.Tensor) -> torch.Tensor:
    """Feature indices by increasing mean activation (ties in index order)."""
    return torch.argsort(activation, stable=True)


def prune_counts(n: int, step_ratio: float) -> list[int]:
    """How many features each step has pruned: 0, s, 2s, ... below n, with s = ceil(n * step_ratio)."""
    return list(range(0, n, max(1, math.ceil(n * step_ratio))))


class ColumnMask:
    """The head's pruned input columns, kept at zero."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        self.pruned = torch.zeros(0, dtype=torch.long, device=head.weight.device)

    @torch.no_grad()
    def set(self, columns: torch.Tensor, original: torch.Tensor) -> None:
        """Prune exactly `columns`: the weight goes back to `original` and those columns are zeroed."""
        self.head.weight.copy_(original)
        self.pruned = columns.to(self.head.weight.device)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        self.head.weight.index_fill_(1, self.pruned, 0.0)


@register
class FinePrune(Recipe):
    name = "fine-prune"
    summary = "prune the features the head reads that clean data activates least, then fine-tune (trigger-agnostic)"
    params = {
        "epochs": Param(20, "fine-tuning passes over the clean subset after pruning"),
        "acc_ratio": Param(0.10, "stop pruning before held-back CA falls by this fraction of the start's"),
        "step_ratio": Param(0.01, "share of the features pruned per step"),
        "prune_ratio": Param(0.0, "prune exactly this share of the features instead of the CA rule (0: CA rule)"),
        "lr": Param(0.01, "fine-tuning SGD learning rate (momentum 0.9, cosine schedule)"),
        "weight_decay": Param(5e-4, "fine-tuning SGD weight decay"),
        "batch_size": Param(256, "batch size"),
        "ca_margin": Param(0.02, "kept state: the latest epoch whose held-back CA is within this of the best epoch's"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def check(self, params: dict[str, Any], trigger: Any) -> None:
        if params["prune_ratio"] >= 1 or params["acc_ratio"] > 1 or params["step_ratio"] > 1:
            raise CleanseError(
                "fine-prune: prune_ratio must be below 1, acc_ratio and step_ratio at most 1 (they are shares)"
            )

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        self._head(model)

    @staticmethod
    def _head(model: ClassifierModel) -> nn.Linear:
        """The classifier head, refused when it does not read a (batch, features) input."""
        head = class_head(model.net, model.spec.num_classes, "fine-prune")
        dims: list[int] = []
        handle = head.register_forward_hook(lambda m, args, out: dims.append(args[0].dim()))
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros(1, *model.spec.input_size, device=model.device))
        finally:
            handle.remove()
            model.train(was_training)
        if dims and dims[-1] != 2:
            raise CleanseError(NOT_FLAT.format(dim=dims[-1]))
        return head

    def run(self, ctx: RecipeContext) -> RecipeResult:
        head = self._head(ctx.model)
        run = RecipeRun.begin(self, ctx)
        activation = mean_head_input(ctx.model, head, ctx.clean.train)
        order = pruning_order(activation)
        mask = ColumnMask(head)
        kept = self._prune(run, mask, order)
        run.result.extra.update(
            {
                "features": head.in_features,
                "pruned": kept,
                "pruned_features": order[:kept].tolist(),
                "mean_activation": activation.tolist(),
            }
        )
        if ctx.params["epochs"] <= 0:
            run.offer(run.measure(), f"pruned {kept}")
        self._finetune(run, mask)
        return run.finish()

    def _prune(self, run: RecipeRun, mask: ColumnMask, order: torch.Tensor) -> int:
        """Prune by the CA rule (or `prune_ratio`); leaves the model at the count kept and returns it."""
        p, model, held = run.ctx.params, run.model, run.ctx.clean.held
        original = mask.head.weight.detach().clone()
        n = len(order)
        if p["prune_ratio"] > 0:
            kept = min(n - 1, math.ceil(n * p["prune_ratio"]))
            mask.set(order[:kept], original)
            run.row("prune", kept, **run.measure(), detail=f"pruned {kept} of {n} features (prune_ratio)")
            return kept
        start_ca = run.start["clean_accuracy"]
        kept = 0
        for count in prune_counts(n, p["step_ratio"])[1:]:
            mask.set(order[:count], original)
            m = evaluate(model, held, triggered=run.monitor.triggered)
            figures = {"clean_accuracy": m["clean_accuracy"], "attack_success_rate": m["attack_success_rate"]}
            run.row("prune", count, **figures, detail=f"pruned {count} of {n} features")
            if start_ca and (start_ca - m["clean_accuracy"]) / start_ca >= p["acc_ratio"]:
                break
            kept = count
        mask.set(order[:kept], original)
        run.ctx.note(f"fine-prune kept {kept} of {n} features pruned (held-back CA rule, acc_ratio {p['acc_ratio']})")
        return kept

    def _finetune(self, run: RecipeRun, mask: ColumnMask) -> None:
        ctx, p, model = run.ctx, run.ctx.params, run.model
        optimizer = torch.optim.SGD(trainable(model), lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"])
        total = p["epochs"] * steps_per_pass(len(ctx.clean.train), p["batch_size"])
        step = 0
        for epoch in range(1, p["epochs"] + 1):
            model.train()
            loss_sum = torch.zeros((), device=ctx.device)
            seen = 0
            for x, y, _ in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device):
                cosine_lr(optimizer, p["lr"], step, total)
                with autocast(ctx.device, ctx.precision):
                    loss = F.cross_entropy(model(x).float(), y)
                if run.diverged(loss):
                    return
                run.step(optimizer, loss)
                mask.apply()
                step += 1
                loss_sum += loss.detach() * len(y)
                seen += len(y)
            metrics = run.measure()
            run.row("finetune", epoch, loss=float(loss_sum) / max(1, seen), **metrics)
            if run.judge(metrics, f"finetune epoch {epoch}"):
                return
