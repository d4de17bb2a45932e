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
import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.engine.device import autocast
from cleanse.engine.events import Event
from cleanse.models.layers import class_head
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    batches,
    cosine_lr,
    register,
    steps_per_pass,
    trainable,
)
from cleanse.recipes.resume import capture, restore
from cleanse.scan.anomaly import MAD_SCALE


def flag_units(scores: torch.Tensor, threshold: float = 3.5, max_flags: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided robust outlier test on per-unit scores.

    Returns (flagged indices, largest score first; z-scores of every unit). z_j = (s_j - median) /
    (1.4826 * MAD) with the median averaging the two middle values for an even count; a unit is
    flagged when s_j > median and z_j > threshold, and only the `max_flags` largest are kept.
    MAD = 0 leaves z undefined: every z is returned as 0 and nothing is flagged.
    """
    s = scores.detach().float().flatten()
    median = s.quantile(0.5)
    mad = (s - median).abs().quantile(0.5)
    if not mad > 0:
        return torch.zeros(0, dtype=torch.long, device=s.device), torch.zeros_like(s)
    z = (s - median) / (MAD_SCALE * mad)
    candidates = ((s > median) & (z > threshold)).nonzero().flatten()
    order = s[candidates].argsort(descending=True)
    return candidates[order][:max_flags], z


def last_linear(net: nn.Module, num_classes: int) -> nn.Linear:
    """The last nn.Linear in the network whose outputs are the classes."""
    return class_head(net, num_classes, "ulrl")


def reinit_rows(weight: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh rows for `rows`: nn.Linear's uniform init for the direction, the mean norm of the other rows for the length.

    Heads that scale their logits (the cnn's is x1/9) train rows several times longer than the
    default init; a row at the default length starts far behind its neighbours and did not relearn
    its class within the relearning budget on the synthetic set.
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
    summary = "gradient ascent on clean data flags the head units that move most, re-initialise them and relearn (trigger-agnostic)"
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
        "ca_margin": Param(0.02, "kept state: the latest relearning epoch with held-back CA within this of the best epoch"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def run(self, ctx: RecipeContext) -> RecipeResult:
        p, model = ctx.params, ctx.model
        head = last_linear(model.net, model.spec.num_classes)
        opening = self.begin(ctx)
        monitor, keeper, result, began = opening.monitor, opening.keeper, opening.result, opening.began
        original = copy.deepcopy(model.net.state_dict())
        w_orig = head.weight.detach().clone()
        gen = torch.Generator().manual_seed(ctx.seed)

        # 1. Unlearn: gradient ascent on clean CE.
        optimizer = torch.optim.SGD(trainable(model), lr=p["unlearn_lr"], momentum=0.9, weight_decay=p["unlearn_weight_decay"])
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
        ascent_epochs, accuracy, diverged, first = 0, 1.0, False, 1
        resume = ctx.checkpoints.resume
        relearning = resume is not None and resume.position["phase"] == "relearn"
        if resume is not None:
            began = time.perf_counter() - resume.doc["elapsed"]
        if resume is not None and not relearning:
            restore(resume, model, optimizer, gen, keeper, result)
            ascent_epochs, accuracy = resume.position["epoch"], resume.doc["values"]["accuracy"]
            first = ascent_epochs + 1
            schedule.last_epoch = ascent_epochs  # one schedule.step() per finished epoch; the rates came back with the optimiser
        for epoch in range(first, p["unlearn_epochs"] + 1 if not relearning else 1):
            model.train()
            ce_sum = torch.zeros((), device=ctx.device)
            correct = torch.zeros((), device=ctx.device)
            seen = 0
            for x, y, _ in batches(ctx.split.train, p["batch_size"], gen, ctx.device):
                with autocast(ctx.device, ctx.precision):
                    logits = model(x).float()
                ce = F.cross_entropy(logits, y)
                if not math.isfinite(float(ce.detach())):
                    ctx.note(f"ulrl: the ascent loss became non-finite in epoch {epoch}; the ascent stops there")
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                (-ce).backward()
                torch.nn.utils.clip_grad_norm_(trainable(model), p["clip"])
                optimizer.step()
                ce_sum += ce.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
            schedule.step()
            if seen == 0:
                break
            ascent_epochs = epoch
            accuracy = float(correct) / seen
            model.eval()
            metrics = monitor(model)
            row = {"phase": "unlearn", "epoch": epoch, "loss": -float(ce_sum) / seen, "clean_ce": float(ce_sum) / seen,
                   "train_accuracy": accuracy, **metrics, "detail": f"train acc {accuracy:.2f}",
                   "elapsed": time.perf_counter() - began}
            result.history.append(row)
            ctx.callback(Event("row", row))
            if diverged or accuracy <= p["unlearn_acc"]:
                break
            ctx.checkpoints.passed(lambda n: capture(self.name, n, {"phase": "unlearn", "epoch": epoch}, model, optimizer,  # noqa: B023
                                                     gen, keeper, result, time.perf_counter() - began,
                                                     values={"accuracy": accuracy}))  # noqa: B023
        if relearning:  # flagged before the checkpoint; restore() brings back the figures and rows
            flagged = torch.tensor(resume.doc["result"]["extra"]["flagged_units"], dtype=torch.long)  # type: ignore[union-attr]
            flagged_list = flagged.tolist()
        else:
            if accuracy > p["unlearn_acc"]:
                ctx.note(f"ulrl: train accuracy still {accuracy:.2f} after {ascent_epochs} ascent epochs (stop at <= {p['unlearn_acc']})")

            # 2. Flag the head units whose weights moved most.
            scores = (head.weight.detach().float() - w_orig.float()).abs().sum(1)
            if not torch.isfinite(scores).all():
                scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
            flagged, z = flag_units(scores, p["threshold"], p["max_flags"])
            flagged_list = flagged.tolist()
            detail = (", ".join(f"unit {j} (z {float(z[j]):.1f})" for j in flagged_list) if flagged_list
                      else f"none (largest z {float(z.max()):.1f})")
            row = {"phase": "flag", "epoch": ascent_epochs, "detail": f"flagged {detail}", "elapsed": time.perf_counter() - began}
            result.history.append(row)
            ctx.callback(Event("row", row))
            if not flagged_list:
                message = "ulrl: no head unit stands out (as expected for an all-to-all attack): relearning is plain fine-tuning"
                ctx.note(message)
                result.notes.append(message)
            result.extra.update({"flagged_units": flagged_list, "scores": scores.tolist(), "z_scores": z.tolist(),
                                 "flagged_scores": [float(scores[j]) for j in flagged_list],
                                 "flagged_z_scores": [float(z[j]) for j in flagged_list],
                                 "ascent_epochs": ascent_epochs, "ascent_train_accuracy": accuracy})

        # 3. Relearn from the original weights with the flagged rows re-initialised.
        model.net.load_state_dict(original)
        rows = flagged.to(ctx.device)
        with torch.no_grad():
            head.weight[rows] = reinit_rows(w_orig, flagged, gen)
            if head.bias is not None:
                head.bias[rows] = 0.0
        w_ref = w_orig[rows]
        optimizer = torch.optim.SGD(trainable(model), lr=p["lr"], momentum=0.9)
        steps_per_epoch = steps_per_pass(len(ctx.split.train), p["batch_size"])
        total, step, stopped, first = p["epochs"] * steps_per_epoch, 0, False, 1
        if relearning:
            restore(resume, model, optimizer, gen, keeper, result)  # type: ignore[arg-type]
            step, first = resume.position["step"], resume.position["epoch"] + 1  # type: ignore[union-attr]
        for epoch in range(first, p["epochs"] + 1):
            model.train()
            loss_sum, cos_sum, seen = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device), 0
            for x, y, _ in batches(ctx.split.train, p["batch_size"], gen, ctx.device):
                cosine_lr(optimizer, p["lr"], step, total)
                with autocast(ctx.device, ctx.precision):
                    ce = F.cross_entropy(model(x).float(), y)
                cos = (F.cosine_similarity(head.weight[rows].float(), w_ref.float(), dim=1).mean() if len(flagged_list)
                       else torch.zeros((), device=ctx.device))
                loss = ce + p["alpha"] * cos
                reason = keeper.tripped(loss=float(loss.detach()))
                if reason:
                    keeper.rollback(model, reason, ctx)
                    stopped = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum += loss.detach() * len(y)
                cos_sum += cos.detach() * len(y)
                seen += len(y)
            if stopped:
                break
            model.eval()
            metrics = monitor(model)
            cos_mean = float(cos_sum) / max(1, seen)
            row = {"phase": "relearn", "epoch": epoch, "loss": float(loss_sum) / max(1, seen), "cosine": cos_mean, **metrics,
                   "detail": f"cos {cos_mean:.2f}" if flagged_list else "fine-tuning", "elapsed": time.perf_counter() - began}
            result.history.append(row)
            ctx.callback(Event("row", row))
            reason = keeper.tripped(metrics)
            if reason:
                keeper.rollback(model, reason, ctx)
                break
            keeper.offer(model, metrics, f"relearn epoch {epoch}")
            ctx.checkpoints.passed(lambda n: capture(self.name, n, {"phase": "relearn", "epoch": epoch, "step": step},  # noqa: B023
                                                     model, optimizer, gen, keeper, result, time.perf_counter() - began))
        result.kept = keeper.restore_best(model)
        return result
