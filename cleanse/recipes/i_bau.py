"""`i-bau`: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022; github YiZeng623/I-BAU, defense.py and
hypergrad.py; BackdoorBench defense/i-bau.py). Trigger-agnostic.

The minimax  min_theta max_delta  L(theta, delta): a universal perturbation delta (one (1, C, H, W) tensor added to
every image) that the model misclassifies most, and model weights theta that classify correctly despite it. Each round:

1. Inner (the perturbation). delta starts at 0; one pass over the clean subset, one SGD step (lr `pert_lr`) per batch on

       L_in(delta, theta; x, y) = -CE(f_theta(x + delta), y) + pert_reg * ||delta||^2

   with y the model's own predictions on the clean x; optionally projected into the L2 ball of radius `radius` after the
   pass (the official line is commented out, so the default 0 leaves it unbounded).
2. Outer (the model). One optimiser step per batch (x, y) on the implicit hypergradient of

       L_out(delta, theta) = CE(f_theta(x + m * delta), y),   m: `portion` of the batch's rows (at least one) get delta

   through delta*(theta), the inner solution, characterised as the fixed point of Phi(delta, theta) = delta - alpha
   * grad_delta L_in(delta, theta; x0, y0) (one gradient step, alpha = `fp_step`, on the inner loss of the batch x0
   with its true labels y0). By the implicit function theorem,

       dL_out/dtheta = d_theta L_out + (d_theta Phi)^T v,   v = (I - d_delta Phi)^-T d_delta L_out,

   and v is approximated by K fixed-point iterations v <- (d_delta Phi)^T v + d_delta L_out from v = 0, that is the
   truncated Neumann series v_K = sum_{j<K} (I - alpha H)^j d_delta L_out, H the inner loss's Hessian in delta.
   The step backpropagates the scalar L_out - alpha <v, grad_delta L_in> (v held constant), whose gradient in theta is
   exactly that hypergradient, so the fp16 gradient scaler applies as to any loss.

The model stays in eval mode throughout (BatchNorm's running statistics are the start model's, dropout off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cleanse.engine.device import autocast, to_device
from cleanse.errors import CleanseError
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    batches,
    register,
    trainable,
)

INNER_BATCHES = ("first", "current")


def perturb(x: torch.Tensor, delta: torch.Tensor, clamp: bool) -> torch.Tensor:
    """x + delta (delta broadcast over the batch), clipped to [0, 1] when `clamp`."""
    out = x + delta
    return out.clamp(0.0, 1.0) if clamp else out


def inner_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, reg: float, clamp: bool = False
) -> torch.Tensor:
    """L_in = -CE(f(x + delta), y) + reg * ||delta||^2: minimising it maximises the loss of the perturbed batch."""
    return -F.cross_entropy(model(perturb(x, delta, clamp)).float(), y) + reg * delta.float().pow(2).sum()


def search_step(
    model: nn.Module, x: torch.Tensor, delta: torch.Tensor, lr: float, reg: float, clamp: bool = False
) -> torch.Tensor:
    """One SGD step of the universal perturbation on a batch, against the model's own predictions on the clean x:
    delta - lr * grad_delta L_in. Only delta gets gradients; returns the new delta, detached."""
    with torch.no_grad():
        y = model(x).argmax(1)
    d = delta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(inner_loss(model, x, y, d, reg, clamp), d)
    return (d - lr * grad).detach()


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """delta scaled into the L2 ball of `radius` (delta * min(1, radius / ||delta||)); radius 0: unchanged."""
    if radius <= 0:
        return delta
    return delta * (radius / delta.norm().clamp_min(1e-12)).clamp(max=1.0)


def hypergradient_surrogate(
    delta: torch.Tensor,
    outer: Callable[[torch.Tensor], torch.Tensor],
    inner: Callable[[torch.Tensor], torch.Tensor],
    iterations: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L_out): a scalar S whose gradient in the outer variables (whatever `outer` and `inner` depend on besides
    delta) is the implicit hypergradient of L_out at the inner solution delta, by `iterations` fixed-point iterations
    on the map Phi(delta) = delta - alpha * grad_delta inner(delta) (as hypergrad.fixed_point, K = iterations):

        v_0 = 0,  v_{k+1} = v_k - alpha * H v_k + g,   g = d_delta L_out,  H v = d_delta <grad_delta L_in, v>
        S = L_out - alpha * <v_K, grad_delta L_in>     (v_K held constant)

    so dS/dtheta = d_theta L_out + (d_theta Phi)^T v_K. v_1 = g is taken without the product with v_0 = 0, and with no
    iterations S is L_out itself."""
    d = delta.detach().requires_grad_(True)
    loss_out = outer(d)
    if iterations == 0:  # v = 0: no implicit term, and no inner loss to differentiate
        return loss_out, loss_out.detach()
    (g,) = torch.autograd.grad(loss_out, d, retain_graph=True)
    (g_in,) = torch.autograd.grad(inner(d), d, create_graph=True)
    v = g
    for _ in range(iterations - 1):
        (hv,) = torch.autograd.grad(g_in, d, grad_outputs=v, retain_graph=True)
        v = v - alpha * hv + g
    return loss_out - alpha * (v.detach() * g_in).sum(), loss_out.detach()


def perturbed_rows(batch: int, portion: float, gen: torch.Generator) -> torch.Tensor:
    """A (batch,) 0/1 float mask with int(batch * portion) ones (at least one, at most `batch`), at random rows."""
    count = min(batch, max(1, int(batch * portion)))
    mask = torch.zeros(batch)
    mask[torch.randperm(batch, generator=gen)[:count]] = 1.0
    return mask


def outer_step_surrogate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    inner_x: torch.Tensor,
    inner_y: torch.Tensor,
    delta: torch.Tensor,
    p: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The I-BAU outer step's surrogate on the batch (x, y) with delta added to the `rows` (a (B,) 0/1 mask), the
    fixed-point map on the inner batch (inner_x, inner_y): (S, L_out), see hypergradient_surrogate. Needs second
    derivatives of the model, so attention runs on PyTorch's math kernel here."""
    m = rows.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def outer(d: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(perturb(x, m * d, p["clamp"])).float(), y)

    def inner(d: torch.Tensor) -> torch.Tensor:
        return inner_loss(model, inner_x, inner_y, d, p["pert_reg"], p["clamp"])

    # The math attention kernel: the fused ones (flash, memory-efficient) have no second derivative.
    with sdpa_kernel(SDPBackend.MATH):
        return hypergradient_surrogate(delta, outer, inner, p["K"], p["fp_step"])


@register
class IBau(Recipe):
    name = "i-bau"
    summary = (
        "implicit backdoor adversarial unlearning: a universal adversarial perturbation, unlearned through its "
        "implicit hypergradient (trigger-agnostic)"
    )
    resumable = True
    params: ClassVar[dict[str, Param]] = {
        "epochs": Param(5, "rounds: a perturbation search and an unlearning pass each (official n_rounds: 5)"),
        "K": Param(5, "fixed-point iterations of the implicit hypergradient (official: 5)"),
        "lr": Param(
            3e-4,
            "Adam learning rate of the outer (model) step (official code: 1e-3, which cost the CIFAR-10 cnn 15 points "
            "of CA in one round; BackdoorBench: 1e-4 with batch 256)",
        ),
        "batch_size": Param(100, "batch size (official code: 100; BackdoorBench: 256)"),
        "pert_lr": Param(10.0, "SGD learning rate of the perturbation search (official: 10)"),
        "pert_reg": Param(1e-3, "weight of ||delta||^2 in the inner loss (official: 0.001)"),
        "fp_step": Param(0.1, "step alpha of the fixed-point map delta - alpha * grad L_in (official: 0.1)"),
        "portion": Param(0.01, "share of each batch's images that carry delta in the outer loss, at least one"),
        "radius": Param(
            0.0,
            "L2 bound on delta after the search, in [0,1] pixels (0: none, as official; 10 is the "
            "official commented-out value)",
        ),
        "clamp": Param(False, "clip x + delta to [0,1] (official: no clip, the line is commented out)"),
        "inner_batch": Param("first", "the batch of the fixed-point map: 'first' (official) or 'current'"),
        "augment": Param(False, "random flips and 2-pixel shifts (official code: none; BackdoorBench: crop + flip)"),
        "ca_margin": Param(0.02, "kept state: the latest round with held-back CA within this of the best round"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
    }

    def check(self, params: dict[str, Any], trigger: Any) -> None:
        if params["inner_batch"] not in INNER_BATCHES:
            raise CleanseError(
                f"i-bau parameter inner_batch={params['inner_batch']!r} must be one of: {', '.join(INNER_BATCHES)}"
            )
        if params["portion"] > 1:
            raise CleanseError(f"i-bau parameter portion={params['portion']!r} must lie in [0, 1]")

    def run(self, ctx: RecipeContext) -> RecipeResult:
        p, model = ctx.params, ctx.model
        self.check(p, ctx.trigger)
        run = RecipeRun.begin(self, ctx)
        model.eval()
        optimizer = torch.optim.Adam(trainable(model), lr=p["lr"])
        # The fixed-point map's batch: drawn once, before a resumed run's random state comes back, so it is the same.
        first = next(batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device, augment=p["augment"]))
        inner_x, inner_y = first[0], first[1]
        start = run.restore(optimizer).position["epoch"] + 1 if run.resuming() else 1
        for epoch in range(start, p["epochs"] + 1):
            model.eval()
            delta = self._search(run, inner_x)
            means = self._unlearn(run, optimizer, delta, inner_x, inner_y)
            if means is None:
                break
            with torch.no_grad(), autocast(ctx.device, ctx.precision):
                clean, bent = model(inner_x).argmax(1), model(perturb(inner_x, delta, p["clamp"])).argmax(1)
            fooled = float((clean != bent).float().mean())  # the final model on the round's perturbation
            norm = float(delta.float().norm())
            metrics = run.measure()
            run.row(
                "unlearn",
                epoch,
                **means,
                delta_norm=norm,
                fooled=fooled,
                **metrics,
                detail=f"||delta|| {norm:.2f}, fools {fooled:.0%} after the pass",
            )
            if run.judge(metrics, f"round {epoch}"):
                break
            run.passed({"epoch": epoch}, optimizer)
        return run.finish()

    @staticmethod
    def _search(run: RecipeRun, like: torch.Tensor) -> torch.Tensor:
        """The round's universal perturbation: from 0, one step per batch over the clean subset, then the L2 bound."""
        ctx, p = run.ctx, run.ctx.params
        delta = torch.zeros((1, *like.shape[1:]), device=ctx.device)
        for x, _, _ in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device, augment=p["augment"]):
            with autocast(ctx.device, ctx.precision):
                delta = search_step(run.model, x, delta, p["pert_lr"], p["pert_reg"], p["clamp"])
        return project_l2(delta, p["radius"])

    @staticmethod
    def _unlearn(
        run: RecipeRun,
        optimizer: torch.optim.Optimizer,
        delta: torch.Tensor,
        inner_x: torch.Tensor,
        inner_y: torch.Tensor,
    ) -> dict[str, float] | None:
        """One pass of outer steps over the clean subset: the mean outer loss, or None when a loss diverged."""
        ctx, p = run.ctx, run.ctx.params
        total, seen = torch.zeros((), device=ctx.device), 0
        for x, y, _ in batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device, augment=p["augment"]):
            rows = to_device(perturbed_rows(len(y), p["portion"], run.gen), ctx.device)
            ix, iy = (inner_x, inner_y) if p["inner_batch"] == "first" else (x, y)
            with autocast(ctx.device, ctx.precision):
                surrogate, loss_out = outer_step_surrogate(run.model, x, y, rows, ix, iy, delta, p)
            if run.diverged(surrogate):
                return None
            run.step(optimizer, surrogate)
            total, seen = total + loss_out * len(y), seen + len(y)
        return {"loss": float(total) / max(1, seen)}
