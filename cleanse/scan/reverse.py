"""Trigger reverse-engineering for every class at once, in any trigger family (cleanse/scan/families.py).

For each candidate target class k we look for the smallest trigger T_k of the family (a patch: mask m_k and
pattern p_k; an additive signal; a smooth warp) that sends clean images of the other classes to k:

    min  CE(f(T_k(x)), k) + cost_k * size(T_k)

Neural Cleanse's method, generalised from masks to families. The family's parameters are optimised with Adam.
The classes still optimising are stacked into (L*B)-image forwards and backwards per step, at most `chunk` classes
each (the memory budget decides it, cleanse/engine/memory.py; by default every class in one); where one class's B
images are more than a forward may hold, the batch is cut into slices of `images_per_forward` images whose gradients
are summed (the cross-entropy is the whole batch's mean, so each slice's sum is divided by the batch's count). The
model is frozen and in eval mode, so no sample influences another, each class's gradient comes from its own chunk
alone, and one Adam step (elementwise) on the assembled gradients is exactly K independent optimisations, only
computed together, whatever the chunking and slicing (equal up to float rounding: the tests check it).

Each class keeps its own cost schedule: the cost starts at the family's `start_cost` and stays there until the
class's trigger first succeeds; from then on, as in Neural Cleanse, `patience` successful rounds raise it by 1.5x
and `patience` failing rounds lower it by 1.5^1.5. Each class keeps its best state: the smallest size among rounds
whose attack success on the optimisation batches reached the family's success level and whose end-of-round state
also reaches it on the round's last batch.

Early stopping, per class, as in Neural Cleanse: a class whose cost has been raised and lowered at least once and
whose best size has not shrunk below `early_stop_threshold` x its previous best for `early_stop` rounds is done;
so is a class still out of reach half-way through the budget (ours). A finished class keeps its best state and
leaves the batch, so later steps forward only the classes still improving (this is where the arithmetic is saved;
the images a step draws do not change, so a class stops at the same step batched or alone), and the chunks are
re-formed from the classes still live, so every forward but the last of a step is full.

Under torchrun each rank optimises a contiguous block of the classes (cleanse/engine/distributed.py, class_block).
A rank draws every step's images from the same seeded generator, so its classes see the images they see in one
process. At each round's end the ranks exchange their classes' figures (one all-gather): the screen ranks every
class, and a rank whose classes have all stopped keeps stepping until every class has, as one process would (a
retired class's state still moves with Adam's momentum, and the last state is what a class that never reached the
success level keeps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.engine.device import autocast
from cleanse.engine.distributed import SINGLE, Ranks, class_block, gather_rows
from cleanse.engine.events import Callback, Event
from cleanse.engine.memory import frozen
from cleanse.scan.families import PATCH, Family


@dataclass(frozen=True)
class Budget:
    """How much optimisation a scan spends; `steps` is the unit the CLI's --budget names."""

    steps: int
    batch: int  # clean images per step, shared by every class
    round_steps: int = 10  # the cost schedule and best-state bookkeeping act once per round
    patience: int = 2  # rounds (Neural Cleanse: 5 epochs; our rounds are much shorter)
    early_stop: int = 0  # rounds without progress that end a class (0: every class runs every step)
    # The screened schedule (0: off): every class runs the first `screen_steps`; then only the `keep` classes with the
    # smallest triggers so far (at least keep_min, a keep_frac share of the classes) run on to `steps`.
    screen_steps: int = 0
    keep_frac: float = 0.2
    keep_min: int = 3

    def screened(self) -> Budget:
        """This budget with the screened schedule: a quarter of the steps (whole rounds) for every class."""
        rounds = max(1, self.steps // self.round_steps // 4)
        return replace(self, screen_steps=rounds * self.round_steps)

    @property
    def schedule(self) -> str:
        """The schedule's name, as scan.json records it."""
        return "screened" if self.screen_steps else "every"

    def kept_classes(self, k: int) -> int:
        return min(k, max(self.keep_min, math.ceil(self.keep_frac * k)))


# early_stop = 5 x patience, Neural Cleanse's ratio (its early_stop_patience is 5 x its patience).
BUDGETS = {
    "fast": Budget(steps=200, batch=24, round_steps=5, patience=1, early_stop=5),
    "full": Budget(steps=600, batch=32, round_steps=5, patience=2, early_stop=10),
}


@dataclass(frozen=True)
class ReverseSettings:
    """The schedule every family shares (the family brings its own lr, start cost and success level)."""

    betas: tuple[float, float] = (0.5, 0.9)  # Neural Cleanse's Adam betas
    cost_up: float = 1.5
    cost_down: float = 1.5**1.5
    early_stop_threshold: float = (
        0.99  # "no progress": best size above 0.99 x the previous best (TrojanZoo's value; Neural Cleanse 1.0)
    )


@dataclass
class Reversed:
    classes: list[int]
    tensors: dict[str, torch.Tensor]  # the best trigger tensors per class, leading class dimension
    size: torch.Tensor  # (K,) the family's size of each best trigger
    success: torch.Tensor  # (K,) attack success (optimisation batches) of the round the best state came from
    reached: torch.Tensor  # (K,) bool: did the class keep a working trigger (a state that reached the success level)?
    cost: torch.Tensor  # (K,) final cost
    steps_run: (
        torch.Tensor
    )  # (K,) optimisation steps each class took part in (fewer than the budget's when it stopped early)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    # the screened schedule: which classes the screen stopped, and every class's best size when the screen ended
    screened_out: torch.Tensor | None = None
    screen_size: torch.Tensor | None = None

    def trigger_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """The trigger tensors of the i-th class reversed."""
        return {name: t[i] for name, t in self.tensors.items()}

    # the patch family's names, which tests and benchmarks read
    @property
    def masks(self) -> torch.Tensor:
        return self.tensors["mask"]

    @property
    def patterns(self) -> torch.Tensor:
        return self.tensors["pattern"]

    @property
    def mask_l1(self) -> torch.Tensor:
        return self.size


def _stamped_logits(
    model: nn.Module, family: Family, x: torch.Tensor, trigger: list[torch.Tensor], precision: str
) -> torch.Tensor:
    """(L,B,K) float logits of the (B,C,H,W) batch stamped with each of L triggers."""
    stamped = family.stamp(x, trigger)
    n_live, batch = stamped.shape[:2]
    with autocast(x.device, precision):
        out = model(stamped.flatten(0, 1).contiguous(memory_format=torch.channels_last))
    return out.float().view(n_live, batch, -1)


def _hit_rate(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(L,) share of the valid images (other classes') that each trigger sends to its class."""
    hits = (logits.argmax(2) == targets.unsqueeze(1)).float() * valid
    return hits.sum(1) / valid.sum(1).clamp_min(1)


def reverse_triggers(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    budget: Budget,
    settings: ReverseSettings = ReverseSettings(),
    seed: int = 0,
    precision: str = "fp32",
    callback: Callback | None = None,
    family: Family = PATCH,
    chunk: int | None = None,
    ranks: Ranks = SINGLE,
    images_per_forward: int | None = None,
) -> Reversed:
    """Reverse a `family` trigger for each of `classes` from clean uint8 (N,H,W,C) images; one batched optimisation.

    The images drawn at each step depend only on `seed` and the step, so running the classes
    one at a time with the same seed sees exactly the same images (the speed-up benchmark relies on it).
    Each step forwards the live classes in groups of at most `chunk` classes (None: all at once), and each group's
    batch in slices of at most `images_per_forward` images (None: the whole batch; it matters only for a one-class
    chunk).
    The model's parameters are frozen for the run (gradients flow to the trigger parameters only).
    Under torchrun (`ranks`) this rank optimises its block of `classes`; the result holds every class, on every rank.
    """
    began = time.perf_counter()
    device = next(model.parameters()).device
    model.eval()
    n, height, width, channels = images.shape
    shape = (channels, height, width)
    everyone = list(classes)
    n_all, mine = len(everyone), class_block(len(everyone), ranks)
    own = everyone[mine.start : mine.stop]
    k = len(own)
    gen = torch.Generator().manual_seed(seed)
    params = [p.to(device).requires_grad_(True) for p in family.init(own, shape, seed)]
    optimizer = torch.optim.Adam(params, lr=family.lr, betas=settings.betas)
    targets = torch.tensor(own, device=device)
    cost = torch.full((k,), family.start_cost, device=device)
    up = torch.zeros(k, dtype=torch.long, device=device)
    down = torch.zeros(k, dtype=torch.long, device=device)
    best_size = torch.full((k,), math.inf, device=device)
    best = [p.detach().clone() for p in params]
    best_success = torch.zeros(k, device=device)
    reached = torch.zeros(k, dtype=torch.bool, device=device)
    raised = torch.zeros(k, dtype=torch.bool, device=device)
    lowered = torch.zeros(k, dtype=torch.bool, device=device)
    stall = torch.zeros(k, dtype=torch.long, device=device)  # rounds since the best size last shrank by the threshold
    active = torch.ones(k, dtype=torch.bool, device=device)
    live = torch.arange(k, device=device)  # indices of the active classes; changes only at round ends
    steps_run = torch.zeros(k, dtype=torch.long, device=device)
    acc_sum = torch.zeros(k, device=device)
    last_acc = torch.zeros(k, device=device)
    history: list[dict[str, Any]] = []
    rounds = max(1, budget.steps // budget.round_steps)
    batch = min(budget.batch, n)
    total = rounds * budget.round_steps
    chunk = k if chunk is None else max(1, chunk)
    piece = max(1, images_per_forward or batch)
    slices = [slice(i, i + piece) for i in range(0, batch, piece)]
    screened_out = torch.zeros(k, dtype=torch.bool, device=device)
    screened_all = torch.zeros(n_all, dtype=torch.bool, device=device)
    screen_size: torch.Tensor | None = None
    with frozen(model):
        for step in range(total):
            idx = torch.randint(
                0, n, (batch,), generator=gen
            )  # drawn every step, even by a finished class: same images alone or batched
            x = images[idx].to(device).permute(0, 3, 1, 2).float().div_(255)
            y = labels[idx].to(device)
            parts = live.split(chunk) if len(live) else ()  # a rank's classes may all have stopped before others'
            grads = [torch.zeros_like(p) for p in params]  # a retired class's gradient is 0, as when batched
            for part in parts:
                sub = [p[part].detach().requires_grad_(True) for p in params]
                part_targets = targets[part]
                valid = (y.unsqueeze(0) != part_targets.unsqueeze(1)).float()  # images already of class k do not count
                count = valid.sum(1).clamp_min(1)
                outputs = []
                for i, cut in enumerate(slices):
                    logits = _stamped_logits(model, family, x[cut], sub, precision)
                    ce = F.cross_entropy(
                        logits.flatten(0, 1), part_targets.repeat_interleave(logits.shape[1]), reduction="none"
                    ).view_as(valid[:, cut])
                    loss = ((ce * valid[:, cut]).sum(1) / count).sum()  # this slice's share of the batch mean
                    if i == 0:
                        loss = loss + (cost[part] * family.size(sub)).sum()  # the size term once
                    for full, g in zip(grads, torch.autograd.grad(loss, sub), strict=True):
                        full[part] += g
                    outputs.append(logits.detach())
                with torch.no_grad():
                    acc_sum[part] += _hit_rate(torch.cat(outputs, 1), part_targets, valid)
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            optimizer.step()
            with torch.no_grad():
                steps_run[live] += 1
            if (step + 1) % budget.round_steps:
                continue
            with torch.no_grad():
                acc = torch.where(active, acc_sum / budget.round_steps, last_acc)
                last_acc = acc
                acc_sum.zero_()
                size_now = family.size(params)
                ok = active & (acc >= family.success)
                reached |= ok
                # The state a class keeps must itself work, not only the round's average over changing states:
                # the round's last batch, stamped with the state as it ends the round. Only a class whose round
                # succeeded can keep its state, so only those are checked (most of a many-class screen is not).
                works = torch.zeros(k, dtype=torch.bool, device=device)
                checked = ok.nonzero().squeeze(1)
                for part in checked.split(chunk) if len(checked) else ():
                    end = torch.cat(
                        [
                            _stamped_logits(model, family, x[cut], [p[part] for p in params], precision)
                            for cut in slices
                        ],
                        1,
                    )
                    valid = (y.unsqueeze(0) != targets[part].unsqueeze(1)).float()
                    works[part] = _hit_rate(end, targets[part], valid) >= family.success
                better = ok & works & (size_now < best_size)
                prev_best = best_size  # best_size never grows, so this is the smallest best before this round
                best_size = torch.where(better, size_now, best_size)
                for kept, p in zip(best, params, strict=True):
                    kept[better] = p[better]
                best_success[better] = acc[better]
                # Neural Cleanse's schedule, per class, once the class has first succeeded: `patience` successful
                # rounds in a row raise the cost by cost_up, `patience` failing ones lower it by cost_down. Before
                # the first success the cost stays at start_cost: lowering it then lets every trigger balloon.
                up = torch.where(ok, up + 1, torch.zeros_like(up))
                down = torch.where(ok, torch.zeros_like(down), down + 1)
                raise_now = active & reached & (up >= budget.patience)
                lower_now = active & reached & (down >= budget.patience)
                cost = torch.where(raise_now, cost * settings.cost_up, cost)
                cost = torch.where(lower_now, cost / settings.cost_down, cost)
                raised |= raise_now
                lowered |= lower_now
                reset = raise_now | lower_now
                up = torch.where(reset, torch.zeros_like(up), up)
                down = torch.where(reset, torch.zeros_like(down), down)
                if budget.early_stop:
                    found = best_size < math.inf
                    stuck = best_size >= settings.early_stop_threshold * prev_best
                    stall = torch.where(active & found, torch.where(stuck, stall + 1, torch.zeros_like(stall)), stall)
                    done = active & raised & lowered & (stall >= budget.early_stop)
                    # a class still out of reach half-way through the budget gives up: its size is a lower bound
                    done |= active & ~reached & (step + 1 >= total // 2)
                    if bool(done.any()):
                        active &= ~done
                        live = active.nonzero().squeeze(1)
                figures = torch.stack([acc, size_now, best_size, cost, active.float()], 1)
                acc_all, size_all, best_all, cost_all, active_all = gather_rows(figures, n_all, ranks).unbind(1)
                active_all = active_all.bool()
                if budget.screen_steps and step + 1 == budget.screen_steps:  # a decision on every class
                    screen_size = best_size.clone()
                    screened_all = active_all & ~_most_suspicious(best_all, acc_all, budget.kept_classes(n_all))
                    active_all &= ~screened_all
                    screened_out = screened_all[mine.start : mine.stop]
                    active &= ~screened_out
                    live = active.nonzero().squeeze(1)
                row = {
                    "phase": "reverse",
                    "family": family.name,
                    "step": step + 1,
                    "steps": total,
                    "attack_success": acc_all.tolist(),
                    "size": size_all.tolist(),
                    "best_size": best_all.tolist(),
                    "cost": cost_all.tolist(),
                    "active": active_all.tolist(),
                    "chunk": chunk,  # classes per forward at most
                    "slices": len(slices),  # forwards each chunk's batch is cut into
                    "forwards": len(parts),  # forwards per step in this round (this rank's)
                    "screened_out": screened_all.tolist(),
                    "elapsed": time.perf_counter() - began,
                }
                history.append(row)
                if callback is not None:
                    callback(Event("row", row))
                if not bool(active_all.any()):
                    break
    with torch.no_grad():
        # A class with no kept state keeps its last one: it never succeeded, or its rounds succeeded on average but
        # the state that ended them never held on the round's last batch (an inf size would turn every class's
        # anomaly index into NaN). Only a kept state counts as a working trigger.
        never = ~torch.isfinite(best_size)
        reached = ~never
        for kept, p in zip(best, params, strict=True):
            kept[never] = p[never]
        best_size = torch.where(never, family.size(params), best_size)
        best_success = torch.where(never, last_acc, best_success)

        def every(rows: torch.Tensor) -> torch.Tensor:
            return gather_rows(rows, n_all, ranks).cpu()

        tensors = {name: every(t) for name, t in family.tensors(best, shape).items()}
    return Reversed(
        everyone,
        tensors,
        every(best_size),
        every(best_success),
        every(reached),
        every(cost),
        every(steps_run),
        history,
        time.perf_counter() - began,
        every(screened_out) if screen_size is not None else None,
        every(screen_size) if screen_size is not None else None,
    )


def _most_suspicious(best_size: torch.Tensor, success: torch.Tensor, keep: int) -> torch.Tensor:
    """(K,) bool: the `keep` classes with the smallest working trigger so far; after them the classes with no working
    trigger yet, highest attack success of the last round first; ties by class index (deterministic)."""
    by_success = torch.sort(-success.cpu(), stable=True).indices
    order = by_success[torch.sort(best_size.cpu()[by_success], stable=True).indices][:keep]
    chosen = torch.zeros(len(best_size), dtype=torch.bool)
    chosen[order] = True
    return chosen.to(best_size.device)


def projected_sizes(rev: Reversed) -> tuple[torch.Tensor, float]:
    """The sizes the anomaly test compares, and the log shrink applied to the classes the screen stopped.

    A class the screen stopped has its screen-end size, larger than what the full budget would have reached, and
    mixing those with the full-budget sizes of the classes that ran on would make the latter look small. So the
    stopped classes' sizes are scaled by the median shrink exp(median(log(final / screen-end))) of the classes
    that ran on (those with a working trigger at both points): the full-budget size they would have reached if they
    shrank like the others. Without the screened schedule, or with no class to measure the shrink on, the sizes are
    returned unchanged (shrink 0).
    """
    if rev.screened_out is None or rev.screen_size is None or not bool(rev.screened_out.any()):
        return rev.size, 0.0
    screen_steps = int(rev.steps_run[rev.screened_out].max())
    # still optimising after the screen (kept, not finished early), with a working trigger at both points
    ran_on = (rev.steps_run > screen_steps) & rev.reached & torch.isfinite(rev.screen_size)
    if not bool(ran_on.any()):
        return rev.size, 0.0
    shrink = float((rev.size[ran_on].double().log() - rev.screen_size[ran_on].double().log()).median())
    shrink = min(shrink, 0.0)  # more budget never grows a best size
    cut = rev.screened_out & rev.reached
    sizes = torch.where(cut, rev.size * math.exp(shrink), rev.size)
    return sizes, shrink
