"""`grad-prune`: gradients of an unlearning loss pick the units to prune, then fine-tuning.

Clean images x of the subset are paired with triggered copies T(x) kept at their
true labels y (rows whose class is not the target). The unlearning loss is

    L_u = CE(f(T(x)), y)

The units are found by tracing (cleanse/recipes/units.py): the output channels of
convs whose output reaches a BatchNorm or an activation, and the hidden units of
MLPs (rows of a Linear that feeds an activation); a model without any is refused
before any work. Each round computes mean |dL_u/dW| over each unit's weights (one
score per conv filter or Linear row, eval mode, on the training part of the subset),
ranks the units of ALL layers together and prunes the highest-scoring one(s) not yet
pruned. A pruned unit is masked persistently: its filter or row and bias and the
following BatchNorm's gamma and beta are zeroed and re-zeroed after every optimiser step.
After each round the held-back unlearning loss and CA are measured; the round with
the lowest held-back unlearning loss is kept. Pruning stops when held-back CA has
fallen `ca_drop` (absolute) from the start, after `patience` rounds without a new
lowest loss, or at `max_rounds`. Then fine-tuning on CE(f(x), y) + CE(f(T(x)), y)
(SGD lr 1e-3, momentum 0.9, weight decay 5e-4; BatchNorm statistics frozen by
default, since batches of the small subset made them drift) with early stopping on
the held-back value of that loss.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.data.dataset import Dataset
from cleanse.engine.device import autocast
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    as_batch,
    batches,
    register,
    repair_loss,
    trainable,
)
from cleanse.recipes.units import UnitLayer, trace_units

Unit = tuple[str, int]  # (layer, unit): a conv output channel or a Linear output feature

NO_UNITS = (
    "grad-prune found no prunable units (conv channels followed by BatchNorm/activation, or MLP hidden units) "
    "in this model; use --method tar-ewc or ulrl"
)


def unit_scores(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean |dL/dW| over each unit's weights (every weight dimension but the first): one score per output unit."""
    return {name: g.abs().flatten(1).mean(1) for name, g in grads.items()}


def rank_from_grads(
    grads: dict[str, torch.Tensor], exclude: set[Unit] | frozenset = frozenset()
) -> list[tuple[str, int, float]]:
    """All units of all layers, highest score first, leaving out `exclude`."""
    scores = unit_scores(grads)
    names = list(scores)
    flat = torch.cat([scores[n].float() for n in names])
    owner = [(n, c) for n in names for c in range(len(scores[n]))]
    order = torch.argsort(flat, descending=True, stable=True).tolist()
    values = flat.tolist()
    return [(owner[i][0], owner[i][1], values[i]) for i in order if owner[i] not in exclude]


def rank_units(
    layers: dict[str, UnitLayer], loss: torch.Tensor, exclude: set[Unit] | frozenset = frozenset()
) -> list[tuple[str, int, float]]:
    """Rank every unit of `layers` by mean |d loss / dW|, across all layers at once."""
    grads = torch.autograd.grad(loss, [m.weight for m in layers.values()], allow_unused=True)
    return rank_from_grads(
        {n: torch.zeros_like(m.weight) if g is None else g for (n, m), g in zip(layers.items(), grads, strict=True)},
        exclude,
    )


def following_batchnorm(net: nn.Module, example: torch.Tensor) -> dict[str, str | None]:
    """For each conv, the BatchNorm that normalises its output channels (directly or through pooling/activations),
    else None (units.trace_units: a BatchNorm after a residual sum does not count)."""
    trace = trace_units(net, example)
    return {n: f for n, f in trace.follower.items() if isinstance(trace.layers[n], nn.Conv2d)}


class UnitMasks:
    """Pruned units, kept at zero: the conv filter or Linear row (and bias), and the following BatchNorm's gamma and
    beta."""

    def __init__(self, net: nn.Module, followers: dict[str, str | None]) -> None:
        self.modules = dict(net.named_modules())
        self.followers = followers
        self.pruned: list[Unit] = []

    def add(self, units: list[Unit]) -> None:
        self.pruned.extend(units)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        by_layer: dict[str, list[int]] = {}
        for name, channel in self.pruned:
            by_layer.setdefault(name, []).append(channel)
        for name, channels in by_layer.items():
            idx = torch.tensor(channels, device=self.modules[name].weight.device)
            layer = self.modules[name]
            layer.weight.index_fill_(0, idx, 0.0)
            if layer.bias is not None:
                layer.bias.index_fill_(0, idx, 0.0)
            bn_name = self.followers.get(name)
            if bn_name is not None:
                bn = self.modules[bn_name]
                bn.weight.index_fill_(0, idx, 0.0)
                bn.bias.index_fill_(0, idx, 0.0)


@register
class GradPrune(Recipe):
    name = "grad-prune"
    steps_in_pieces = True
    summary = (
        "prune the conv channels / MLP units with the largest unlearning-loss gradient (trigger at true labels), "
        "then fine-tune"
    )
    needs_trigger = True
    params = {
        "epochs": Param(
            10,
            "fine-tuning budget: at most this many passes over the clean subset "
            "(early stopping usually ends it sooner)",
        ),
        "max_rounds": Param(40, "pruning rounds at most"),
        "per_round": Param(1, "units pruned per round (published: 1; more is faster on big nets)"),
        "patience": Param(10, "stop pruning after this many rounds without a lower held-back unlearning loss"),
        "ca_drop": Param(0.10, "stop pruning once held-back CA has fallen this much (absolute) from the start"),
        "grad_samples": Param(1024, "triggered training images used for each round's gradient (0: all)"),
        "lr": Param(1e-3, "fine-tuning SGD learning rate (momentum 0.9)"),
        "weight_decay": Param(5e-4, "fine-tuning SGD weight decay"),
        "ft_patience": Param(3, "stop fine-tuning after this many epochs without a lower held-back loss"),
        "batch_size": Param(64, "batch size"),
        "freeze_bn": Param(True, "fine-tune with BatchNorm statistics frozen (eval mode)"),
        "asr_good": Param(0.01, "kept state: any held-back ASR at or below this counts as equal (then higher CA wins)"),
        "ca_margin": Param(0.02, "kept state: held-back CA within this of the start"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start during fine-tuning"),
    }

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        self._units(model)

    @staticmethod
    def _units(model: ClassifierModel) -> tuple[dict[str, UnitLayer], dict[str, str | None]]:
        """The prunable layers and, for each, the BatchNorm that follows it (None: none); refuses a model without."""
        c, h, w = model.spec.input_size
        trace = trace_units(model.net, torch.zeros(1, c, h, w, device=model.device))
        layers = trace.prunable()
        if not layers:
            raise CleanseError(NO_UNITS)
        return layers, {n: trace.follower[n] for n in layers}

    def run(self, ctx: RecipeContext) -> RecipeResult:
        layers, followers = self._units(ctx.model)  # before any work
        run = RecipeRun.begin(self, ctx, asr_good=ctx.params["asr_good"], start_row=False)  # its start row adds a loss
        p, model, trigger = ctx.params, ctx.model, ctx.trigger
        train, held = ctx.clean.train, ctx.clean.held
        assert trigger is not None  # begin() refused a missing one

        # Triggered copies at their true labels, non-target rows only.
        triggered_all = trigger.apply_uint8(train.images)
        eligible = trigger.eligible(train.labels)
        rows = eligible.nonzero().flatten()
        if p["grad_samples"] > 0 and len(rows) > p["grad_samples"]:
            rows = rows[torch.randperm(len(rows), generator=run.gen)[: p["grad_samples"]]].sort().values
        grad_set = Dataset(triggered_all[rows], train.labels[rows], train.classes, train.source)
        held_rows = trigger.eligible(held.labels)
        held_trig = Dataset(
            trigger.apply_uint8(held.images[held_rows]), held.labels[held_rows], held.classes, held.source
        )
        if len(grad_set) == 0 or len(held_trig) == 0:
            raise CleanseError(
                "grad-prune needs clean images of classes other than the trigger's target in the subset; "
                "raise --clean-frac"
            )
        u_start = self._held_loss(model, held_trig, None, ctx)
        run.row("start", 0, loss=u_start, **run.start, elapsed=0.0)

        masks = UnitMasks(model.net, followers)
        self._prune(run, layers, masks, grad_set, held_trig, u_start)
        self._finetune(run, masks, triggered_all, eligible, held_trig)
        result = run.finish()
        # The start state is unpruned; any other kept state carries the masks of the kept round.
        result.extra["pruned_in_kept_state"] = [] if result.kept["tag"] == "start" else result.extra["pruned"]
        return result

    def _prune(
        self,
        run: RecipeRun,
        layers: dict[str, UnitLayer],
        masks: UnitMasks,
        grad_set: Dataset,
        held_trig: Dataset,
        u_start: float,
    ) -> None:
        """Pruning rounds from the start's held-back unlearning loss `u_start`; leaves the model (and `masks`) at the
        round with the lowest held-back unlearning loss."""
        ctx, p, model, start = run.ctx, run.ctx.params, run.model, run.start
        best_u, best_round, best_state, best_pruned = u_start, 0, None, 0
        rounds: list[dict[str, Any]] = []
        stale, rnd = 0, 0
        total_units = sum(m.weight.shape[0] for m in layers.values())
        while rnd < p["max_rounds"] and len(masks.pruned) < total_units:
            rnd += 1
            grads = self._unlearning_grads(model, layers, grad_set, p["batch_size"], ctx)
            ranked = rank_from_grads(grads, set(masks.pruned))
            picked = [(name, ch) for name, ch, _ in ranked[: max(1, p["per_round"])]]
            masks.add(picked)
            metrics = run.measure()
            u = self._held_loss(model, held_trig, None, ctx)
            rounds.append(
                {
                    "round": rnd,
                    "filters": [f"{n}:{ch}" for n, ch in picked],  # the units (key kept for older run records)
                    "scores": [s for _, _, s in ranked[: len(picked)]],
                    "held_unlearning_loss": u,
                    **metrics,
                }
            )
            shown = ", ".join(f"{n}:{ch}" for n, ch in picked[:3]) + (", ..." if len(picked) > 3 else "")
            run.row("prune", rnd, loss=u, **metrics, detail=f"pruned {len(masks.pruned)} ({shown})")
            fell = metrics["clean_accuracy"] <= start["clean_accuracy"] - p["ca_drop"] + 1e-12
            if not fell and u < best_u:
                best_u, best_round, best_pruned, stale = u, rnd, len(masks.pruned), 0
                best_state = copy.deepcopy(model.net.state_dict())
            else:
                stale += 1
            if fell:
                ctx.note(
                    f"held-back CA {metrics['clean_accuracy']:.3f} fell {p['ca_drop']:.2f} from the start: "
                    f"pruning stops at round {rnd}"
                )
                break
            if stale >= p["patience"]:
                ctx.note(f"{stale} rounds without a lower held-back unlearning loss: pruning stops at round {rnd}")
                break
        masks.pruned = masks.pruned[:best_pruned]
        # No round helped: back to the start, nothing pruned.
        model.net.load_state_dict(best_state if best_state is not None else run.keeper.best_state)
        masks.apply()
        ctx.note(
            f"kept pruning round {best_round} ({best_pruned} units), held-back unlearning loss "
            f"{u_start:.3f} -> {best_u:.3f}"
        )
        run.result.extra.update(
            {
                "rounds": rounds,
                "kept_round": best_round,
                "pruned": [f"{n}:{ch}" for n, ch in masks.pruned],
                "batchnorm_after": masks.followers,
            }
        )
        # Fine-tuning is part of the recipe: the bare pruned state is a candidate only without it.
        if best_round and p["epochs"] <= 0:
            run.offer({k: v for k, v in rounds[best_round - 1].items() if k in start}, f"pruned round {best_round}")

    def _finetune(
        self,
        run: RecipeRun,
        masks: UnitMasks,
        triggered_all: torch.Tensor,
        eligible: torch.Tensor,
        held_trig: Dataset,
    ) -> None:
        """Fine-tuning on clean CE + triggered-true-label CE, pruned units kept at zero, early stopping on the held-back
        loss."""
        ctx, p, model, train, held = run.ctx, run.ctx.params, run.model, run.ctx.clean.train, run.ctx.clean.held
        optimizer = torch.optim.SGD(trainable(model), lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"])
        best_loss = start_loss = self._held_loss(model, held_trig, held, ctx)
        stale = 0
        for epoch in range(1, p["epochs"] + 1):
            model.train(not p["freeze_bn"])
            loss_sum, seen = torch.zeros((), device=ctx.device), 0
            for x, y, idx in batches(train, p["batch_size"], run.gen, ctx.device):
                count = int(eligible[idx].sum())  # the batch's triggered rows, which its pieces share

                def losses(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int = count) -> tuple:
                    ce = functools.partial(run.batch_ce, count=count)
                    rows = idx[eligible[idx]]
                    return (repair_loss(model, x, y, triggered_all, rows, train.labels, ctx.device, ce=ce),)

                stepped = run.step_pieces(optimizer, x, y, idx, losses, images_per_row=2)
                if stepped is None:
                    return
                (loss,) = stepped
                masks.apply()
                loss_sum, seen = loss_sum + loss.detach() * len(y), seen + len(y)
            metrics = run.measure()
            held_loss = self._held_loss(model, held_trig, held, ctx)
            run.row(
                "finetune",
                epoch,
                loss=float(loss_sum) / max(1, seen),
                **metrics,
                detail=f"held loss {held_loss:.3f} (pruned state {start_loss:.3f})",
            )
            if run.judge(metrics, f"finetune epoch {epoch}"):
                return
            if held_loss < best_loss:
                best_loss, stale = held_loss, 0
            else:
                stale += 1
                if stale >= p["ft_patience"]:
                    ctx.note(f"{stale} epochs without a lower held-back loss: fine-tuning stops at epoch {epoch}")
                    return

    @staticmethod
    def _unlearning_grads(
        model: nn.Module, layers: dict[str, UnitLayer], data: Dataset, batch_size: int, ctx: RecipeContext
    ) -> dict[str, torch.Tensor]:
        """d L_u / dW for every prunable layer, L_u the mean CE over `data` (eval mode: BatchNorm statistics stay
        put)."""
        model.eval()
        weights = [m.weight for m in layers.values()]
        total = [torch.zeros_like(w) for w in weights]
        size = min(batch_size, ctx.memory.rows_per_forward()) if ctx.memory is not None else batch_size  # sums: exact
        for start in range(0, len(data), size):
            x = as_batch(data.images[start : start + size], ctx.device)
            y = data.labels[start : start + size].to(ctx.device)
            with autocast(ctx.device, ctx.precision):
                loss = F.cross_entropy(model(x).float(), y, reduction="sum") / len(data)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for t, g in zip(total, grads, strict=True):
                if g is not None:
                    t.add_(g)
        return dict(zip(layers, total, strict=True))

    @staticmethod
    @torch.no_grad()
    def _held_loss(model: nn.Module, triggered: Dataset, clean: Dataset | None, ctx: RecipeContext) -> float:
        """Held-back CE of the triggered copies at their true labels (+ clean CE when `clean` is given), eval mode."""
        model.eval()
        total = torch.zeros((), device=ctx.device)
        for data in (triggered, clean) if clean is not None else (triggered,):
            part = torch.zeros((), device=ctx.device)
            for start in range(0, len(data), 256):
                x = as_batch(data.images[start : start + 256], ctx.device)
                with autocast(ctx.device, ctx.precision):
                    part += F.cross_entropy(
                        model(x).float(), data.labels[start : start + 256].to(ctx.device), reduction="sum"
                    )
            total += part / max(1, len(data))
        return float(total)
