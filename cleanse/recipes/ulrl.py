"""`ulrl`: unlearn, then relearn. Trigger-agnostic.

1. Unlearn: gradient ascent on clean cross-entropy over the clean subset (SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, grad-norm clip 20, LR x0.1 at epochs 10 and 20) until
   that epoch's running train accuracy is <= 0.2, or `unlearn_epochs` passes.
2. Flag: score each output unit j of the last linear layer by s_j = ||W_after[j] - W_orig[j]||_1
   and flag it when s_j > median(s) and z_j = (s_j - median) / (1.4826 * MAD) > 3.5, keeping at
   most the two largest; MAD = 0 flags nothing. A backdoor's target unit is the one the clean
   ascent has to move most, since it stays wired to features the clean data does not explain.
3. Relearn: reload the original weights, re-initialise the flagged rows (bias 0) and fine-tune
   every weight for `epochs` passes on CE(f(x), y) + alpha * mean_j cos(W[j], W_orig[j]) over the
   flagged rows (SGD lr 0.005, cosine schedule, no weight decay).

For an all-to-all attack no single unit stands out, nothing is flagged, and step 3 is plain
fine-tuning.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.models import ClassifierModel
from cleanse.models.layers import class_head
from cleanse.recipes.base import (
    Losses,
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
from cleanse.stats import median_and_mad


def flag_units(scores: torch.Tensor, threshold: float = 3.5, max_flags: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided robust outlier test on per-unit scores.

    Returns (flagged indices, largest score first; z-scores of every unit). z_j = (s_j - median) /
    (1.4826 * MAD) with the median averaging the two middle values for an even count; a unit is
    flagged when s_j > median and z_j > threshold, and only the `max_flags` largest are kept.
    MAD = 0 leaves z undefined: every z is returned as 0 and nothing is flagged.
    """
    s = scores.detach().float().flatten()
    median, spread = median_and_mad(s)
    if not spread > 0:
        return torch.zeros(0, dtype=torch.long, device=s.device), torch.zeros_like(s)
    z = (s - median) / spread
    candidates = ((s > median) & (z > threshold)).nonzero().flatten()
    order = s[candidates].argsort(descending=True)
    return candidates[order][:max_flags], z


def last_linear(net: nn.Module, num_classes: int) -> nn.Linear:
    """The last nn.Linear in the network whose outputs are the classes."""
    return class_head(net, num_classes, "ulrl")


def reinit_rows(weight: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh rows for `rows`: nn.Linear's uniform init for the direction, the other rows' mean norm for the length.

    Heads that scale their logits (the cnn's is x1/9) train rows several times longer than the
    default init; a row at the default length starts far behind its neighbours and may not relearn
    its class within the budget (measured: docs/recipes/ulrl.md, "Re-initialisation length").
    """
    fresh = torch.rand(len(rows), weight.shape[1], generator=gen) * 2 - 1
    fresh = fresh.to(weight.device, torch.float32)
    others = torch.ones(len(weight), dtype=torch.bool, device=weight.device)
    others[rows.to(weight.device)] = False
    length = weight[others].float().norm(dim=1).mean() if others.any() else weight.float().norm(dim=1).mean()
    return (fresh / fresh.norm(dim=1, keepdim=True).clamp_min(1e-12) * length).to(weight.dtype)


@register
class Ulrl(Recipe):
    name = "ulrl"
    steps_in_pieces = True
    summary = (
        "gradient ascent on clean data flags the head units that move most, re-initialise them and relearn "
        "(trigger-agnostic)"
    )
    resumable = True
    params: ClassVar[dict[str, Param]] = {
        "epochs": Param(20, "relearning passes over the clean subset"),
        "lr": Param(0.005, "relearning SGD learning rate (momentum 0.9, cosine schedule, no weight decay)"),
        "alpha": Param(0.7, "weight of the cosine similarity between each flagged row and its original"),
        "unlearn_epochs": Param(20, "at most this many gradient-ascent passes"),
        "unlearn_lr": Param(0.01, "gradient-ascent SGD learning rate (momentum 0.9, x0.1 at epochs 10 and 20)"),
        "unlearn_weight_decay": Param(5e-4, "gradient-ascent SGD weight decay"),
        "unlearn_acc": Param(0.2, "stop the ascent once an epoch's running train accuracy is at or below this"),
        "clip": Param(20.0, "gradient-norm clip during the ascent"),
        "threshold": Param(3.5, "flag a unit whose robust z-score of weight change exceeds this"),
        "max_flags": Param(2, "flag at most this many units (the largest changes)"),
        "batch_size": Param(64, "batch size"),
        "ca_margin": Param(
            0.02, "kept state: the latest relearning epoch with held-back CA within this of the best epoch"
        ),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        last_linear(model.net, model.spec.num_classes)

    def run(self, ctx: RecipeContext) -> RecipeResult:
        model = ctx.model
        head = last_linear(model.net, model.spec.num_classes)  # before any work
        run = RecipeRun.begin(self, ctx)
        original = copy.deepcopy(model.net.state_dict())
        w_orig = head.weight.detach().clone()
        saved = run.resuming("relearn")
        if saved is not None:  # flagged before the checkpoint; restore() brings back the figures and rows
            flagged = list(saved.doc["result"]["extra"]["flagged_units"])
        else:
            ascent_epochs, accuracy = self._unlearn(run)
            flagged = self._flag(run, head, w_orig, ascent_epochs, accuracy)
        model.net.load_state_dict(original)
        self._relearn(run, head, w_orig, flagged)
        return run.finish()

    def _unlearn(self, run: RecipeRun) -> tuple[int, float]:
        """1. Gradient ascent on clean CE; returns the epochs it ran and the last one's running train accuracy."""
        ctx, p, model = run.ctx, run.ctx.params, run.model
        optimizer = torch.optim.SGD(
            trainable(model), lr=p["unlearn_lr"], momentum=0.9, weight_decay=p["unlearn_weight_decay"]
        )
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
        ascent_epochs, accuracy, diverged = 0, 1.0, False
        if run.resuming("unlearn"):
            resumed = run.restore(optimizer)
            ascent_epochs, accuracy = resumed.position["epoch"], resumed.values["accuracy"]
            # one schedule.step() per finished epoch; the rates came back with the optimiser
            schedule.last_epoch = ascent_epochs
        for epoch in range(ascent_epochs + 1, p["unlearn_epochs"] + 1):
            model.train()
            ce_sum = torch.zeros((), device=ctx.device)
            correct = torch.zeros((), device=ctx.device)
            seen = 0
            for x, y, idx in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device):
                _, ce, hit = run.backward_pieces(optimizer, x, y, idx, _ascent_losses(model), scaled=False)
                if not math.isfinite(float(ce)):  # the ascent stops; nothing to roll back to in this phase
                    ctx.note(f"ulrl: the ascent loss became non-finite in epoch {epoch}; the ascent stops there")
                    diverged = True
                    break
                torch.nn.utils.clip_grad_norm_(trainable(model), p["clip"])
                optimizer.step()
                ce_sum += ce * len(y)
                correct += (hit * len(y)).round()  # the batch's correct rows (its pieces' shares, added up)
                seen += len(y)
            schedule.step()
            if seen == 0:
                break
            ascent_epochs, accuracy = epoch, float(correct) / seen
            metrics = run.measure()
            run.row(
                "unlearn",
                epoch,
                loss=-float(ce_sum) / seen,
                clean_ce=float(ce_sum) / seen,
                train_accuracy=accuracy,
                **metrics,
                detail=f"train acc {accuracy:.2f}",
            )
            if diverged or accuracy <= p["unlearn_acc"]:
                break
            run.passed({"phase": "unlearn", "epoch": epoch}, optimizer, values={"accuracy": accuracy})
        return ascent_epochs, accuracy

    @staticmethod
    def _flag(run: RecipeRun, head: nn.Linear, w_orig: torch.Tensor, ascent_epochs: int, accuracy: float) -> list[int]:
        """2. The head units whose weights the ascent moved most (robust z-score of the L1 change of their rows)."""
        ctx, p, result = run.ctx, run.ctx.params, run.result
        if accuracy > p["unlearn_acc"]:
            ctx.note(
                f"ulrl: train accuracy still {accuracy:.2f} after {ascent_epochs} ascent epochs "
                f"(stop at <= {p['unlearn_acc']})"
            )
        scores = (head.weight.detach().float() - w_orig.float()).abs().sum(1)
        if not torch.isfinite(scores).all():
            scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        units, z = flag_units(scores, p["threshold"], p["max_flags"])
        flagged = units.tolist()
        detail = (
            ", ".join(f"unit {j} (z {float(z[j]):.1f})" for j in flagged)
            if flagged
            else f"none (largest z {float(z.max()):.1f})"
        )
        run.row("flag", ascent_epochs, detail=f"flagged {detail}")
        if not flagged:
            message = (
                "ulrl: no head unit stands out (as expected for an all-to-all attack): relearning is plain fine-tuning"
            )
            ctx.note(message)
            result.notes.append(message)
        result.extra.update(
            {
                "flagged_units": flagged,
                "scores": scores.tolist(),
                "z_scores": z.tolist(),
                "flagged_scores": [float(scores[j]) for j in flagged],
                "flagged_z_scores": [float(z[j]) for j in flagged],
                "ascent_epochs": ascent_epochs,
                "ascent_train_accuracy": accuracy,
            }
        )
        return flagged

    @staticmethod
    def _relearn(run: RecipeRun, head: nn.Linear, w_orig: torch.Tensor, flagged: list[int]) -> None:
        """3. From the original weights with the flagged rows re-initialised: CE + alpha * cosine(new row, old row)."""
        ctx, p, model = run.ctx, run.ctx.params, run.model
        units = torch.tensor(flagged, dtype=torch.long)
        rows = units.to(ctx.device)
        with torch.no_grad():
            head.weight[rows] = reinit_rows(w_orig, units, run.gen)
            if head.bias is not None:
                head.bias[rows] = 0.0
        w_ref = w_orig[rows]
        optimizer = torch.optim.SGD(trainable(model), lr=p["lr"], momentum=0.9)
        total = p["epochs"] * steps_per_pass(len(ctx.clean.train), p["batch_size"])
        step, first = 0, 1
        if run.resuming("relearn"):
            at = run.restore(optimizer).position
            step, first = at["step"], at["epoch"] + 1
        for epoch in range(first, p["epochs"] + 1):
            model.train()
            loss_sum, cos_sum, seen = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device), 0
            for x, y, idx in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device):
                cosine_lr(optimizer, p["lr"], step, total)

                def losses(x: torch.Tensor, y: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    ce = F.cross_entropy(model(x).float(), y)
                    cos = (  # a term of the weights alone: each piece adds its share of it
                        F.cosine_similarity(head.weight[rows].float(), w_ref.float(), dim=1).mean()
                        if flagged
                        else torch.zeros((), device=ctx.device)
                    )
                    return ce + p["alpha"] * cos, cos

                stepped = run.step_pieces(optimizer, x, y, idx, losses)
                if stepped is None:
                    return
                loss, cos = stepped
                step += 1
                loss_sum += loss * len(y)
                cos_sum += cos * len(y)
                seen += len(y)
            metrics = run.measure()
            cos_mean = float(cos_sum) / max(1, seen)
            run.row(
                "relearn",
                epoch,
                loss=float(loss_sum) / max(1, seen),
                cosine=cos_mean,
                **metrics,
                detail=f"cos {cos_mean:.2f}" if flagged else "fine-tuning",
            )
            if run.judge(metrics, f"relearn epoch {epoch}"):
                return
            run.passed({"phase": "relearn", "epoch": epoch, "step": step}, optimizer)


def _ascent_losses(model: torch.nn.Module) -> Losses:
    """Phase 1's (-CE, CE, accuracy) of the rows given: gradient ascent on the clean CE."""

    def losses(x: torch.Tensor, y: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = model(x).float()
        ce = F.cross_entropy(logits, y)
        return -ce, ce, (logits.detach().argmax(1) == y).float().mean()

    return losses
