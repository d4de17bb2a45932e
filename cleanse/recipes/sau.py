"""`sau`: Shared Adversarial Unlearning (Wei et al., NeurIPS 2023). Trigger-agnostic.

f_bd is a frozen copy of the start model, f_theta the model being cleaned. Per batch (x, y):

1. Shared PGD: from delta = +eps, `pgd_steps` signed steps of size `pgd_step` that minimise

       beta * L_adv + L_js,
       L_adv = -(sum_{i not flipped by f_theta} CE(f_theta(x_i + delta_i), y_i)
                 + sum_{i not flipped by f_bd} CE(f_bd(x_i + delta_i), y_i)) / (2B)
       L_js  = sum_{i not shared} JS(softmax f_theta(x_i + delta_i) || softmax f_bd(x_i + delta_i)) / B

   with delta kept in the L-inf ball of radius eps and x + delta in [0, 1]. A model has
   "flipped" a sample when its prediction on x + delta differs from its prediction on x;
   a sample is "shared" when both models flipped it to the same label. The search stops early
   once every sample is shared. These are the adversarial examples the two models get wrong the
   same way, which is what a backdoor trigger is.
2. One optimiser step on

       CE(f_theta(x), y) + sar_weight * (1/B) * sum_{i fooled} -log(1 - p_theta(y_bd,i | x_i + delta_i))

   where y_bd = argmax f_bd(x + delta) and f_bd is fooled on i when y_bd,i != y_i and y_bd,i
   differs from f_bd's prediction on x_i. f_theta stays in eval mode throughout, so BatchNorm
   uses and keeps the start model's running statistics.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.engine.device import GradScaling, autocast
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    batches,
    register,
    steps_per_pass,
    trainable,
)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence (nats) between the two softmax distributions."""
    p = F.softmax(logits_a, dim=1).clamp_min(1e-8)
    q = F.softmax(logits_b, dim=1).clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p.log() - m.log())).sum(1) + (q * (q.log() - m.log())).sum(1))


def shared_pgd(
    model: nn.Module,
    frozen: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 0.2,
    step: float = 0.2,
    steps: int = 5,
    beta: float = 0.01,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared adversarial examples for a batch of [0,1] images; returns (x_adv, shared mask at x_adv).

    Both models should be in eval mode; only delta gets gradients (parameters' .grad are untouched).
    """
    with torch.no_grad(), autocast(x.device, precision):
        own = model(x).argmax(1)
        ref = frozen(x).argmax(1)
    delta = (x + eps).clamp(0, 1) - x
    b = len(x)
    for i in range(steps + 1):
        delta.requires_grad_(i < steps)
        with torch.set_grad_enabled(i < steps), autocast(x.device, precision):
            logits = model(x + delta).float()
            logits_ref = frozen(x + delta).float()
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        flipped, flipped_ref = pred != own, pred_ref != ref
        shared = flipped & flipped_ref & (pred == pred_ref)
        if i == steps or bool(shared.all()):
            break
        ce = F.cross_entropy(logits, y, reduction="none")
        ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
        loss_adv = -(ce[~flipped].sum() + ce_ref[~flipped_ref].sum()) / (2 * b)
        loss_js = js_divergence(logits, logits_ref)[~shared].sum() / b
        (grad,) = torch.autograd.grad(beta * loss_adv + loss_js, delta)
        with torch.no_grad():
            delta = (delta - step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach(), shared.detach()


def sau_step(
    model: nn.Module,
    frozen: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    p: dict[str, Any],
    precision: str = "fp32",
    scaling: GradScaling | None = None,
) -> dict[str, torch.Tensor]:
    """One SAU update on a batch: shared PGD, then one step on clean CE + the shared-adversarial unlearning term.

    Puts `model` in eval mode (BatchNorm frozen). Returns detached figures: loss, clean CE, the
    unlearning term, and the share of shared / fooled samples. Steps whatever the loss (looking at it here would make
    the host wait for the device every step): the caller's divergence check rolls a non-finite one back.
    """
    model.eval()
    x_adv, shared = shared_pgd(model, frozen, x, y, p["eps"], p["pgd_step"], p["pgd_steps"], p["beta"], precision)
    with autocast(x.device, precision):
        logits, logits_adv = model(torch.cat([x, x_adv])).float().chunk(2)
        with torch.no_grad():
            ref_clean, ref_adv = frozen(torch.cat([x, x_adv])).float().chunk(2)
    y_bd = ref_adv.argmax(1)
    fooled = (y_bd != y) & (y_bd != ref_clean.argmax(1))
    p_bd = F.softmax(logits_adv, dim=1).gather(1, y_bd[:, None]).squeeze(1)
    sar = -(torch.log1p(-p_bd.clamp(max=1 - 1e-6)) * fooled).sum() / len(x)
    ce = F.cross_entropy(logits, y)
    loss = ce + p["sar_weight"] * sar
    (scaling or GradScaling(x.device, "fp32")).step(optimizer, loss)
    return {
        "loss": loss.detach(),
        "clean_ce": ce.detach(),
        "sar": sar.detach(),
        "shared": shared.float().mean(),
        "fooled": fooled.float().mean(),
    }


def planned_passes(n_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Passes over `n_train` images: `epochs`, or more when that many passes make fewer than `min_steps` steps."""
    return max(epochs, -(-min_steps // steps_per_pass(n_train, batch_size)))


@register
class Sau(Recipe):
    name = "sau"
    summary = (
        "shared adversarial unlearning: unlearn the adversarial examples the model and its frozen copy share "
        "(trigger-agnostic)"
    )
    resumable = True
    params: ClassVar[dict[str, Param]] = {
        "epochs": Param(5, "passes over the clean subset (published: 100); more when min_steps asks for them"),
        "min_steps": Param(
            180, "at least this many Adam steps in all: a small subset gets more passes (0: exactly `epochs`)"
        ),
        "lr": Param(1e-4, "Adam learning rate, constant (published)"),
        "batch_size": Param(64, "batch size (published: 256)"),
        "eps": Param(0.2, "L-inf radius of the shared perturbation, in [0,1] pixel units"),
        "pgd_step": Param(0.2, "PGD signed step size"),
        "pgd_steps": Param(5, "PGD steps per batch"),
        "beta": Param(0.01, "weight of the adversarial loss against the JS term in the PGD objective"),
        "sar_weight": Param(1.0, "weight of the shared-adversarial unlearning term against clean CE"),
        "augment": Param(False, "random flips and 2-pixel shifts of each batch (published: none)"),
        "ca_margin": Param(0.02, "kept state: the latest epoch with held-back CA within this of the best epoch"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def run(self, ctx: RecipeContext) -> RecipeResult:
        p, model = ctx.params, ctx.model
        run = RecipeRun.begin(self, ctx)
        frozen = copy.deepcopy(model).eval()
        frozen.requires_grad_(False)
        optimizer = torch.optim.Adam(trainable(model), lr=p["lr"])
        n_train = len(ctx.clean.train)
        passes = planned_passes(n_train, p["batch_size"], p["epochs"], p["min_steps"])
        if passes > p["epochs"]:
            ctx.note(
                f"sau: {n_train} images make {steps_per_pass(n_train, p['batch_size'])} steps a pass, so it makes "
                f"{passes} passes instead of {p['epochs']} to reach min_steps={p['min_steps']} "
                "(--param min_steps=0 keeps exactly --epochs)"
            )
        run.result.extra["passes"] = passes
        first = run.restore(optimizer).position["epoch"] + 1 if run.resuming() else 1
        for epoch in range(first, passes + 1):
            means = self._epoch(run, frozen, optimizer)
            if means is None:
                break
            metrics = run.measure()
            run.row(
                "unlearn",
                epoch,
                **means,
                **metrics,
                detail=f"shared {means['shared']:.0%}, fooled {means['fooled']:.0%}, SAR {means['sar']:.3f}",
            )
            if run.judge(metrics, f"epoch {epoch}"):
                break
            run.passed({"epoch": epoch}, optimizer)
        run.result.extra["final_shared"] = run.result.history[-1]["shared"] if run.result.history else None
        return run.finish()

    @staticmethod
    def _epoch(run: RecipeRun, frozen: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
        """One pass of SAU steps over the clean subset: the figures' means, or None when a loss diverged (rolled
        back)."""
        ctx, p = run.ctx, run.ctx.params
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        for x, y, _ in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device, augment=p["augment"]):
            figures = sau_step(run.model, frozen, optimizer, x, y, p, ctx.precision, run.scaling)
            if run.diverged(figures["loss"]):
                return None
            for k, v in figures.items():
                sums[k] = sums.get(k, 0) + v * len(y)
            seen += len(y)
        return {k: float(v) / max(1, seen) for k, v in sums.items()}
