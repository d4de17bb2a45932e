"""`anp`: Adversarial Neuron Perturbation (Wu & Wang, NeurIPS 2021; github csdongxian/ANP_backdoor,
optimize_mask_cifar.py and prune_neuron_cifar.py).

Every BatchNorm channel k ("neuron") gets a mask m_k in [0, 1] (start 1) and perturbations d_k, e_k of its scale and
shift: with the perturbation on it computes

    BN_k(x) = gamma_k * (m_k + d_k) * xhat_k + beta_k * (1 + e_k)

and without it gamma_k * m_k * xhat_k + beta_k (xhat normalised by the batch's statistics, as the official code's
train-mode forward; the running statistics are not touched). Each iteration, on a batch of clean images:

1. d, e ~ U(-eps, eps), then `steps` signed-gradient ascent steps of size eps / steps on CE with the perturbation;
2. one SGD step (momentum 0.9) on the masks of alpha * CE(unperturbed) + (1 - alpha) * CE(perturbed), then the masks
   are clipped to [0, 1].

Neurons whose mask ends at or below a threshold are pruned: the BatchNorm's gamma_k is zeroed (the official
pruning zeroes the weight only, so the channel outputs its shift beta_k). Backdoor neurons are the ones that
small perturbations easily turn into misclassification, so their masks fall. The threshold is swept from
`threshold` (official 0.2) up to `pruning_max` in steps of `pruning_step` (BackdoorBench's and backdoor-toolbox's
ANP: 0.05 to 0.90 by 0.05, keeping the largest within a CA-drop budget); each threshold's model is a candidate
state, so the trigger-agnostic rule keeps the largest threshold whose held-back CA is within `ca_margin` of the
best candidate's, and a threshold below the CA floor ends the sweep.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.data.dataset import Dataset
from cleanse.engine.device import autocast
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.recipes.base import Param, Recipe, RecipeContext, RecipeResult, RecipeRun, batches, register

NO_BATCHNORM = (
    "anp masks and perturbs BatchNorm neurons and this model has no affine BatchNorm (ViT, Swin and ConvNeXt use "
    "LayerNorm); use --method tar-ewc with a trigger (cleanse scan reverses one) or fine-prune"
)

BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorms(net: nn.Module) -> dict[str, BatchNorm]:
    """The affine BatchNorm layers of `net`, in module order."""
    return {n: m for n, m in net.named_modules() if isinstance(m, BatchNorm) and m.affine}


class NeuronPerturbation:
    """Masks and perturbations of every BatchNorm neuron, applied by forward hooks that recompute the layers."""

    def __init__(self, norms: dict[str, BatchNorm], device: torch.device) -> None:
        self.norms = norms

        def zeros() -> dict[str, torch.Tensor]:
            return {n: torch.zeros(m.num_features, device=device, requires_grad=True) for n, m in norms.items()}

        self.mask = {n: torch.ones(m.num_features, device=device, requires_grad=True) for n, m in norms.items()}
        self.noise, self.noise_bias = zeros(), zeros()
        self.perturbed = False
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in norms.items()]

    def _hook(self, name: str) -> Any:
        def hook(bn: BatchNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
            scale = self.mask[name] + self.noise[name] if self.perturbed else self.mask[name]
            shift = 1.0 + self.noise_bias[name] if self.perturbed else 1.0
            return F.batch_norm(args[0], None, None, bn.weight * scale, bn.bias * shift, True, 0.0, bn.eps)

        return hook

    def masks(self) -> list[torch.Tensor]:
        return list(self.mask.values())

    def noises(self) -> list[torch.Tensor]:
        return [*self.noise.values(), *self.noise_bias.values()]

    @torch.no_grad()
    def reset_noise(self, eps: float, gen: torch.Generator) -> None:
        for t in self.noises():
            t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1).mul_(eps))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def mask_step(
    model: nn.Module,
    neurons: NeuronPerturbation,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    alpha: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """One ANP iteration on the batch (x, y): the neuron perturbation, then one mask update; returns the mask loss."""
    if eps > 0:
        neurons.reset_noise(eps, gen)
        neurons.perturbed = True
        for _ in range(steps):
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, neurons.noises())
            with torch.no_grad():
                for t, g in zip(neurons.noises(), grads, strict=True):
                    t.add_(g.sign(), alpha=eps / steps)
    robust = F.cross_entropy(model(x).float(), y) if eps > 0 else torch.zeros((), device=x.device)
    neurons.perturbed = False
    natural = F.cross_entropy(model(x).float(), y)
    loss = alpha * natural + (1 - alpha) * robust
    optimizer.zero_grad(set_to_none=True)
    for t, g in zip(neurons.masks(), torch.autograd.grad(loss, neurons.masks()), strict=True):
        t.grad = g
    optimizer.step()
    with torch.no_grad():
        for t in neurons.masks():
            t.clamp_(0.0, 1.0)
    return loss.detach()


def below_threshold(masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """The neurons to prune: per layer, the channels whose mask is at or below `threshold`."""
    return {n: (m.detach() <= threshold).nonzero().flatten().tolist() for n, m in masks.items()}


def sweep(first: float, last: float, step: float) -> list[float]:
    """The thresholds first, first + step, ... while at most last (within float rounding), rounded to 1e-6."""
    count = int(round((last - first) / step, 6)) + 1 if last > first else 1
    return [round(min(first + i * step, last), 6) for i in range(count)]


def endless_batches(
    data: Dataset, batch_size: int, gen: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Augmented clean batches, pass after pass (the official code samples with replacement)."""
    while True:
        for x, y, _ in batches(data, batch_size, gen, device):
            yield x, y


@register
class Anp(Recipe):
    name = "anp"
    summary = (
        "learn BatchNorm neuron masks under adversarial neuron perturbation, prune the low ones (trigger-agnostic)"
    )
    params = {
        "iterations": Param(500, "mask optimisation iterations (official: 2000)"),
        "eps": Param(0.4, "neuron perturbation budget"),
        "steps": Param(1, "perturbation ascent steps per iteration"),
        "alpha": Param(0.2, "weight of the unperturbed loss (1 - alpha: the perturbed loss)"),
        "lr": Param(0.2, "mask SGD learning rate (momentum 0.9)"),
        "batch_size": Param(128, "batch size"),
        "threshold": Param(0.2, "the sweep's first threshold: prune the neurons whose mask is at or below it"),
        "pruning_max": Param(
            0.9,
            "the sweep's last threshold (equal to threshold: prune once at threshold, the official script's default)",
            changed_default_when_added=True,
        ),
        "pruning_step": Param(0.05, "the sweep's step between thresholds"),
        "report_every": Param(100, "iterations between live rows"),
        "ca_margin": Param(0.02, "kept state: within this of the best held-back CA (as every recipe)"),
        "ca_floor_drop": Param(0.10, "keep the model unchanged when pruning costs more held-back CA than this"),
    }

    def check(self, params: dict[str, Any], trigger: Any) -> None:
        if params["alpha"] > 1 or params["threshold"] > 1 or params["steps"] < 1:
            raise CleanseError("anp: alpha and threshold must lie in [0, 1] and steps be at least 1")
        if not params["threshold"] <= params["pruning_max"] <= 1 or params["pruning_step"] <= 0:
            raise CleanseError("anp: need threshold <= pruning_max <= 1 and pruning_step > 0; set --param pruning_max")

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        if not batchnorms(model.net):
            raise CleanseError(NO_BATCHNORM)

    def run(self, ctx: RecipeContext) -> RecipeResult:
        norms = batchnorms(ctx.model.net)
        if not norms:
            raise CleanseError(NO_BATCHNORM)
        run = RecipeRun.begin(self, ctx)
        p, model = ctx.params, ctx.model
        neurons = NeuronPerturbation(norms, ctx.device)
        optimizer = torch.optim.SGD(neurons.masks(), lr=p["lr"], momentum=0.9)
        total = sum(m.num_features for m in norms.values())
        model.eval()  # dropout off; the hooks normalise by batch statistics as the official train-mode pass
        flags = [q.requires_grad for q in model.net.parameters()]
        model.net.requires_grad_(False)  # only the masks and perturbations are learned
        try:
            stream = endless_batches(ctx.clean.train, p["batch_size"], run.gen, ctx.device)
            loss_sum, since = torch.zeros((), device=ctx.device), 0
            for it in range(1, p["iterations"] + 1):
                x, y = next(stream)
                with autocast(ctx.device, ctx.precision):
                    loss = mask_step(model, neurons, optimizer, x, y, p["eps"], p["steps"], p["alpha"], run.gen)
                loss_sum, since = loss_sum + loss, since + 1
                if it % p["report_every"] == 0 or it == p["iterations"]:
                    low = sum(len(v) for v in below_threshold(neurons.mask, p["threshold"]).values())
                    mean = float(loss_sum) / since
                    run.row("mask", it, loss=mean, detail=f"{low} of {total} masks <= {p['threshold']:g}")
                    loss_sum, since = torch.zeros((), device=ctx.device), 0
            masks = {n: m.detach().clone() for n, m in neurons.mask.items()}
        finally:
            neurons.close()
            for q, flag in zip(model.net.parameters(), flags, strict=True):
                q.requires_grad_(flag)
        kept: dict[str, list[int]] = {}
        for threshold in sweep(p["threshold"], p["pruning_max"], p["pruning_step"]):
            pruned = below_threshold(masks, threshold)
            with torch.no_grad():  # cumulative: a larger threshold prunes a superset of the channels
                for name, channels in pruned.items():
                    if channels:
                        weight = norms[name].weight
                        assert weight is not None
                        weight.index_fill_(0, torch.tensor(channels, device=weight.device), 0.0)
            count = sum(len(v) for v in pruned.values())
            metrics = run.measure()
            tag = f"threshold {threshold:.2f}"
            run.row("prune", p["iterations"], **metrics, detail=f"{tag}: pruned {count} of {total} neurons")
            if run.judge(metrics, tag):
                break
            if run.keeper.best["tag"] == tag:
                kept = pruned
        result = run.finish()
        result.extra.update(
            {"pruned": {n: v for n, v in kept.items() if v}, "masks": {n: m.cpu().tolist() for n, m in masks.items()}}
        )
        return result
