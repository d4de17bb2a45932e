"""The recipe interface, its registry, and the pieces every recipe shares.

A recipe gets the model, the clean split (learn on `train`, decide on `held`),
an optional trigger and its parameters; it changes the model in place and
returns its history. Its `run` opens a RecipeRun, which owns the plumbing every
recipe's loops share: the held-back monitor (CA, ASR and TAR on the held-back
images), the state rule (StateKeeper or AgnosticKeeper) applied in its
documented order, history rows, rollbacks, checkpoints and resume.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cleanse.attacks.trigger import Trigger
from cleanse.data.dataset import Dataset
from cleanse.data.subset import CleanSplit
from cleanse.engine.augment import flip_translate
from cleanse.engine.device import GradScaling, LaggedScalar, autocast, rows_to_device, to_device
from cleanse.engine.distributed import SINGLE, GradientSync, Ranks, all_sum, average_buffers, from_rank_0, shard
from cleanse.engine.evaluate import TriggeredSet, evaluate
from cleanse.engine.events import Callback, Event
from cleanse.engine.memory import MemoryPlan
from cleanse.engine.tar import measure_tar
from cleanse.engine.train import is_transformer
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.recipes.resume import Checkpoints, RecipeState, capture
from cleanse.recipes.resume import restore as restore_state
from cleanse.registry import Registry

# (x, y, idx) of some rows of a batch -> (loss, *figures) of those rows, as if they were the batch (step_pieces)
Losses = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]

NEEDS_TRIGGER = (
    "{name} needs a trigger file: pass --trigger with the .trigger.safetensors written by "
    "`cleanse poison`, or a trigger-<class>.safetensors reversed by `cleanse scan`"
)


@dataclass
class Param:
    default: Any
    help: str
    # True when adding the parameter changed what the recipe does by default, so a stored benchmark row that does not
    # record it ran the recipe differently (a parameter added with the old behaviour as its default leaves this False).
    changed_default_when_added: bool = False
    # The default on transformer-style nets (LayerNorm or attention, no BatchNorm: engine.train.is_transformer), where
    # it differs from `default` (None: the same); applied by Recipe.for_model unless the user gave the parameter.
    transformer: Any = None


@dataclass
class RecipeContext:
    model: ClassifierModel
    split: CleanSplit | None  # None: a data-free recipe run without --data (Recipe.needs_data False)
    trigger: Trigger | None
    params: dict[str, Any]
    callback: Callback
    precision: str = "fp32"
    seed: int = 0
    tar_layer: str | None = None
    checkpoints: Checkpoints = field(default_factory=Checkpoints)  # --checkpoint-every / --resume
    ranks: Ranks = SINGLE  # under torchrun: the ranks that split each batch (Recipe.data_parallel)
    memory: MemoryPlan | None = None  # what one training forward may hold (`step_pieces`); None: whole batches

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def clean(self) -> CleanSplit:
        """The clean split; every recipe that needs data has one (`unlearn` refuses to run it without --data)."""
        if self.split is None:
            raise CleanseError("this recipe needs clean data: pass --data (and --clean-frac or --clean-n)")
        return self.split

    def note(self, message: str) -> None:
        self.callback(Event("note", {"message": message}))


@dataclass
class RecipeResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept: dict[str, Any] = field(default_factory=dict)  # which state was kept and why
    extra: dict[str, Any] = field(default_factory=dict)  # recipe-specific figures


class Recipe(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    needs_trigger: ClassVar[bool] = False
    # False for a data-free recipe: it runs without --data (held-back figures only when data is given)
    needs_data: ClassVar[bool] = True
    # checkpoints at the end of passes over the clean subset (unlearn --checkpoint-every)
    resumable: ClassVar[bool] = False
    # splits each batch over torchrun's ranks: its loops draw batches, step and measure through RecipeRun, and every
    # figure that drives a decision is the same on every rank (docs/scaling.md)
    data_parallel: ClassVar[bool] = False
    # steps its batches through RecipeRun.step_pieces, so no training forward holds more than unlearn's memory plan
    # (--memory-budget; on a CPU at most CPU_FORWARD_BYTES); the others run each batch in one forward
    steps_in_pieces: ClassVar[bool] = False
    params: ClassVar[dict[str, Param]] = {}

    def resolve_params(self, raw: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(raw) - set(self.params))
        if unknown:
            raise CleanseError(
                f"recipe {self.name} has no parameter {unknown[0]!r}; its parameters are: {', '.join(self.params)}"
            )
        out = {k: p.default for k, p in self.params.items()}
        for key, value in raw.items():
            default = self.params[key].default
            try:
                is_true = str(value).lower() in ("1", "true", "yes")
                out[key] = is_true if isinstance(default, bool) else type(default)(value)
            except (TypeError, ValueError):
                raise CleanseError(
                    f"recipe {self.name} parameter {key}={value!r} is not a valid {type(default).__name__}"
                ) from None
            number = out[key]
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                if not math.isfinite(number) or number < 0:
                    raise CleanseError(f"recipe {self.name} parameter {key}={value!r} must be a finite number >= 0")
                if (key == "batch_size" or key.endswith("lr")) and number <= 0:
                    raise CleanseError(f"recipe {self.name} parameter {key}={value!r} must be positive")
        return out

    def for_model(self, model: ClassifierModel, params: dict[str, Any], given: set[str]) -> dict[str, Any]:
        """`params` with the architecture family's defaults (Param.transformer) for the parameters not in `given`."""
        if not is_transformer(model.net):
            return params
        return {
            k: (p.transformer if p.transformer is not None and k not in given else params[k])
            for k, p in self.params.items()
        }

    def check(self, params: dict[str, Any], trigger: Trigger | None) -> None:
        """Refuse parameters that cannot work with this trigger, before any data is loaded (`unlearn` calls it for
        every recipe it will run, so `--method all` fails at once rather than after the recipes before this one).
        The default accepts every combination."""
        return None

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        """Refuse an architecture the recipe cannot apply to, in one line (a CleanseError), before any work: what
        the recipe's `run` checks first, callable as soon as the model is loaded. The default accepts every model."""
        return None

    @abstractmethod
    def run(self, ctx: RecipeContext) -> RecipeResult:
        """Change ctx.model in place and return the result; a recipe opens a RecipeRun first (RecipeRun.begin)."""


RECIPES: Registry[Recipe] = Registry("recipe")


def register(cls: type[Recipe]) -> type[Recipe]:
    RECIPES.register(cls.name)(cls())
    return cls


# --- shared machinery ---------------------------------------------------------


class HeldMonitor:
    """CA, ASR/RA and TAR on the held-back images: the figures recipes decide on and show live."""

    def __init__(
        self, held: Dataset | None, trigger: Trigger | None, tar_layer: str | None, precision: str = "fp32"
    ) -> None:
        self.held, self.trigger, self.tar_layer, self.precision = held, trigger, tar_layer, precision
        self.triggered = TriggeredSet.build(held, trigger) if trigger is not None and held is not None else None

    def __call__(self, model: ClassifierModel) -> dict[str, Any]:
        if self.held is None:  # no --data: nothing held back to measure on
            return {"clean_accuracy": None, "attack_success_rate": None}
        m = evaluate(model, self.held, precision=self.precision, triggered=self.triggered)
        out = {"clean_accuracy": m["clean_accuracy"], "attack_success_rate": m["attack_success_rate"]}
        if self.trigger is not None and self.tar_layer is not None:
            t = measure_tar(model, self.held.images, self.held.labels, self.trigger, self.tar_layer, with_clean=False)
            out["tar"] = t["tar"] if t["tar"] is not None else t["cam_shift"]
        return out


class StateKeeper:
    """Keep the best state by one documented rule; roll back when a guard rail trips.

    With `use_asr` (a recipe that relies on its trigger): the lowest held-back ASR among
    states whose held-back CA is within `ca_margin` of the start, where every ASR at or
    below `asr_good` counts as equal, so among those the higher CA wins.
    Otherwise: the highest held-back CA. Never silently the last. Trigger-agnostic recipes use
    AgnosticKeeper instead.
    """

    def __init__(
        self,
        model: ClassifierModel,
        start: dict[str, Any],
        use_asr: bool,
        ca_margin: float,
        ca_floor_drop: float,
        asr_good: float = 0.0,
    ) -> None:
        self.asr_good = asr_good
        self.use_asr = use_asr and start.get("attack_success_rate") is not None
        self.start_ca = start["clean_accuracy"]
        self.ca_margin, self.floor = ca_margin, self.start_ca - ca_floor_drop
        self.best_state = copy.deepcopy(model.net.state_dict())
        self.best = dict(start, tag="start")
        self.rollbacks: list[str] = []

    def _key(self, m: dict[str, Any]) -> tuple:
        eligible = m["clean_accuracy"] >= self.start_ca - self.ca_margin
        if self.use_asr:
            return (eligible, -max(m["attack_success_rate"], self.asr_good), m["clean_accuracy"])
        return (True, m["clean_accuracy"])

    def offer(self, model: ClassifierModel, metrics: dict[str, Any], tag: str) -> bool:
        """Consider the current state; True when it became the kept one. A state below the CA floor never is."""
        if self.tripped(metrics) is None and self._key(metrics) > self._key(self.best):
            self.best_state = copy.deepcopy(model.net.state_dict())
            self.best = dict(metrics, tag=tag)
            return True
        return False

    def tripped(self, metrics: dict[str, Any] | None = None, loss: float | None = None) -> str | None:
        if loss is not None and not math.isfinite(loss):
            return f"loss became non-finite ({loss})"
        if metrics is not None and metrics["clean_accuracy"] < self.floor:
            return f"held-back CA {metrics['clean_accuracy']:.3f} fell below the floor {self.floor:.3f}"
        return None

    def rollback(self, model: ClassifierModel, reason: str, ctx: RecipeContext) -> None:
        model.net.load_state_dict(self.best_state)
        message = f"rollback: {reason}; restored the state kept so far ({self.best['tag']})"
        self.rollbacks.append(message)
        ctx.note(message)

    def restore_best(self, model: ClassifierModel) -> dict[str, Any]:
        model.net.load_state_dict(self.best_state)
        rule = (
            f"lowest held-back ASR (any <= {self.asr_good:.3f} counts as equal, then higher CA) with held-back CA "
            f"within {self.ca_margin:.2f} of the start"
            if self.use_asr
            else "highest held-back CA"
        )
        return {
            "tag": self.best["tag"],
            "rule": rule,
            "held_back": {k: v for k, v in self.best.items() if k != "tag"},
            "rollbacks": self.rollbacks,
            "unchanged": self.best["tag"] == "start",
        }


class AgnosticKeeper(StateKeeper):
    """The state rule for trigger-agnostic recipes, which help only by changing the model.

    Kept: the latest of the recipe's own states whose held-back CA is within `ca_margin` of the
    best held-back CA among them (later states have had more of the recipe's budget). The start
    state is not a candidate, only what a rollback returns to before any state was offered: with
    a held-back set of a few dozen images the start often scores 100% and would always win.
    A state below the CA floor is never kept; RecipeRun.judge checks `tripped` before `offer`, so such a
    state rolls back to the one kept so far.
    """

    def __init__(self, model: ClassifierModel, start: dict[str, Any], ca_margin: float, ca_floor_drop: float) -> None:
        super().__init__(model, start, use_asr=False, ca_margin=ca_margin, ca_floor_drop=ca_floor_drop)
        self.top_ca = -math.inf

    def offer(self, model: ClassifierModel, metrics: dict[str, Any], tag: str) -> bool:
        if self.tripped(metrics) is not None:
            return False
        self.top_ca = max(self.top_ca, metrics["clean_accuracy"])
        if metrics["clean_accuracy"] >= self.top_ca - self.ca_margin:
            self.best_state = copy.deepcopy(model.net.state_dict())
            self.best = dict(metrics, tag=tag)
            return True
        return False

    def restore_best(self, model: ClassifierModel) -> dict[str, Any]:
        kept = super().restore_best(model)
        kept["rule"] = (
            f"latest of the recipe's states with held-back CA within {self.ca_margin:.2f} of the best "
            "among them (the start state only as a rollback fallback)"
        )
        return kept


class LatestKeeper(StateKeeper):
    """The state rule of a data-free recipe run without data: no held-back images to judge a state by, so the
    recipe's latest offered state is kept; only a non-finite loss rolls back (to the start, or the latest offered)."""

    def __init__(self, model: ClassifierModel, start: dict[str, Any]) -> None:
        self.asr_good, self.use_asr = 0.0, False
        self.best_state = copy.deepcopy(model.net.state_dict())
        self.best = dict(start, tag="start")
        self.rollbacks = []

    def offer(self, model: ClassifierModel, metrics: dict[str, Any], tag: str) -> bool:
        self.best_state = copy.deepcopy(model.net.state_dict())
        self.best = dict(metrics, tag=tag)
        return True

    def tripped(self, metrics: dict[str, Any] | None = None, loss: float | None = None) -> str | None:
        return super().tripped(None, loss)

    def restore_best(self, model: ClassifierModel) -> dict[str, Any]:
        kept = super().restore_best(model)
        kept["rule"] = "the recipe's latest state (no --data: no held-back images to judge states by)"
        return kept


@dataclass(frozen=True)
class Resumed:
    """What RecipeRun.restore hands back: where the interrupted run stood, the recipe's own saved values and tensors."""

    position: dict[str, Any]
    values: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class RecipeRun:
    """One run of a recipe: the plumbing its loops share, so that the recipe's `run` reads as its algorithm.

    `RecipeRun.begin` refuses a missing trigger the recipe needs, measures the start on the held-back images, sets
    up the state rule (StateKeeper on held-back ASR for a recipe that needs a trigger, AgnosticKeeper otherwise) and
    shows the start row. Then the recipe calls:

    - `measure()` for the held-back figures and `row(phase, epoch, **figures)` to record and show them;
    - `judge(metrics, tag)` after each measured state: the state rule in its documented order. Held-back CA below
      the floor rolls back to the state kept so far and returns True (the caller stops); only a state that passed
      is offered to the keeper, so a state below the floor is never kept. `offer` considers a state without the
      guard rail (the keeper still never keeps one below the floor);
    - `diverged(loss)` before each optimiser step: a non-finite loss rolls back and returns True;
    - `passed(position, optimizer)` at the end of each pass over the clean subset (`unlearn --checkpoint-every`),
      and `resuming(phase)` / `restore(optimizer)` to continue an interrupted run;
    - `finish()` last: the kept state goes back into the model and the result, `kept` set, is returned.
    """

    def __init__(
        self,
        name: str,
        ctx: RecipeContext,
        monitor: HeldMonitor,
        start: dict[str, Any],
        keeper: StateKeeper,
        began: float | None = None,
    ) -> None:
        self.name, self.ctx, self.model = name, ctx, ctx.model
        self.monitor, self.start, self.keeper = monitor, start, keeper
        self.result = RecipeResult()
        self.gen = torch.Generator().manual_seed(ctx.seed)  # the recipe's random stream: batches, draws; checkpointed
        self.scaling = GradScaling(ctx.device, ctx.precision)  # fp16: torch's gradient scaler; else a plain step
        self.ranks = ctx.ranks
        self._sync = GradientSync(self.model.net.parameters(), ctx.ranks) if ctx.ranks.parallel else None
        self._share = 1.0  # this rank's rows / the global batch's rows, for the batch (or piece) being stepped
        self.batch_rows = torch.empty(0, dtype=torch.long)  # the global batch's row indices (every rank's)
        self._loss = LaggedScalar(ctx.device)
        self.resume = ctx.checkpoints.resume
        began = time.perf_counter() if began is None else began
        self._began = began - self.resume.doc["elapsed"] if self.resume else began  # a resumed run's clock goes on

    @classmethod
    def begin(cls, recipe: Recipe, ctx: RecipeContext, asr_good: float = 0.0, start_row: bool = True) -> RecipeRun:
        """Open the run of `recipe`: the start measured on the held-back images, the state rule, the start row shown
        (`start_row=False`: the recipe shows its own, with figures of its own)."""
        if recipe.needs_trigger and ctx.trigger is None:
            raise CleanseError(NEEDS_TRIGGER.format(name=recipe.name))
        p, model = ctx.params, ctx.model
        monitor = HeldMonitor(ctx.clean.held if ctx.split is not None else None, ctx.trigger, ctx.tar_layer)
        began = time.perf_counter()
        start = _figures(monitor, model, ctx.ranks)
        keeper: StateKeeper
        if ctx.split is None:
            keeper = LatestKeeper(model, start)
        elif recipe.needs_trigger:
            keeper = StateKeeper(
                model,
                start,
                use_asr=True,
                ca_margin=p["ca_margin"],
                ca_floor_drop=p["ca_floor_drop"],
                asr_good=asr_good,
            )
        else:
            keeper = AgnosticKeeper(model, start, ca_margin=p["ca_margin"], ca_floor_drop=p["ca_floor_drop"])
        run = cls(recipe.name, ctx, monitor, start, keeper, began)
        if start_row:
            run.show({"phase": "start", "epoch": 0, **start, "elapsed": 0.0})
        return run

    # --- figures and rows ---

    def elapsed(self) -> float:
        """Seconds since the run began (a resumed run counts the interrupted one's too)."""
        return time.perf_counter() - self._began

    def measure(self) -> dict[str, Any]:
        """Held-back CA and ASR (and TAR) of the model as it stands; leaves the model in eval mode. Under torchrun rank
        0 measures and every rank gets its figures, so the state rule decides alike everywhere."""
        return _figures(self.monitor, self.model, self.ranks)

    # --- batches and steps, split over torchrun's ranks for a data-parallel recipe ---

    def batches(
        self, data: Dataset, batch_size: int, augment: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`batches` of the clean subset from the run's random stream; under torchrun this rank's shard of each global
        batch (a global batch with fewer rows than ranks, a short last one, is skipped on every rank). `batch_rows`
        holds the global batch's rows while it is stepped."""
        for x, y, idx, whole in _batches(data, batch_size, self.gen, self.ctx.device, augment, self.ranks):
            if len(whole) < self.ranks.world:
                continue
            self._share, self.batch_rows = len(idx) / len(whole), whole
            yield x, y, idx

    @property
    def _whole_batch(self) -> bool:
        """This process holds the whole batch in one forward: no torchrun shard (a rank's share of a batch is below 1,
        since a batch with fewer rows than ranks is skipped) and no piece (`backward_pieces`)."""
        return self._share == 1.0

    def batch_mean(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """The mean of a per-row figure over `count` rows of the global batch, of which `values` are this rank's (or
        this piece's): for the whole batch in one process values.mean(); else scaled so that the share-weighted sum
        over ranks (and pieces) that `step` applies to gradients and scalars is the mean over the `count` rows."""
        if self._whole_batch:
            return values.mean()
        return values.sum() / (count * self._share)

    def batch_ce(self, logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
        """The cross-entropy of some rows of the batch as their mean over `count` rows of the global batch
        (`batch_mean`): F.cross_entropy's own mean, bit for bit, when the batch is neither cut nor split."""
        if self._whole_batch:
            return F.cross_entropy(logits, labels)
        return self.batch_mean(F.cross_entropy(logits, labels, reduction="none"), count)

    def globally(self, value: torch.Tensor) -> torch.Tensor:
        """A per-batch mean of this rank's rows as the global batch's mean (itself in one process)."""
        return all_sum(value.detach().float() * self._share, self.ranks) if self.ranks.parallel else value

    def row(self, phase: str, epoch: float, elapsed: float | None = None, **figures: Any) -> dict[str, Any]:
        """Append a history row {phase, epoch, **figures, elapsed} and show it live."""
        row = {"phase": phase, "epoch": epoch, **figures, "elapsed": self.elapsed() if elapsed is None else elapsed}
        self.result.history.append(row)
        self.show(row)
        return row

    def show(self, row: dict[str, Any]) -> None:
        """Show a row live without recording it in the history."""
        self.ctx.callback(Event("row", row))

    # --- the state rule ---

    def judge(self, metrics: dict[str, Any], tag: str | None) -> bool:
        """Apply the state rule to the current state: True when its held-back CA fell below the floor and the run
        rolled back (the caller stops); otherwise the state is offered under `tag` (None: not a candidate yet)."""
        reason = self.keeper.tripped(metrics)
        if reason:
            self.rollback(reason)
            return True
        if tag is not None:
            self.keeper.offer(self.model, metrics, tag)
        return False

    def offer(self, metrics: dict[str, Any], tag: str) -> bool:
        """Offer the current state without the guard rail; True when it became the kept one."""
        return self.keeper.offer(self.model, metrics, tag)

    def diverged(self, loss: torch.Tensor | float) -> bool:
        """True when the loss is not finite and the run rolled back (the caller stops stepping). On an accelerator the
        host reads each step's loss one step late (LaggedScalar), so the device never waits for it; the step taken
        meanwhile is undone by the same rollback."""
        value = self._loss.exchange(self.globally(loss)) if isinstance(loss, torch.Tensor) else float(loss)
        reason = self.keeper.tripped(loss=value) if value is not None else None
        if reason:
            self.rollback(reason)
            return True
        return False

    def rows_per_forward(self, images_per_row: int = 1) -> int | None:
        """Rows of a batch one training forward may hold (`ctx.memory`), each row putting `images_per_row` images
        through the model; None without a memory plan (whole batches)."""
        plan = self.ctx.memory
        return None if plan is None else plan.rows_per_forward(images_per_row)

    def pieces(self, rows: int, images_per_row: int = 1) -> int:
        """Into how many near-equal pieces (sizes differing by at most one row) a batch of `rows` rows is cut: enough
        that none exceeds `rows_per_forward`. Under torchrun the count comes from the global batch, so every rank runs
        the same number of forwards (SyncBatchNorm's collectives must pair up) on a shard of floor or ceil(global /
        ranks) rows, and never more pieces than the smaller shard has rows."""
        size = self.rows_per_forward(images_per_row)
        if size is None:
            return 1
        if not self.ranks.parallel:
            return max(1, -(-rows // size))
        total, world = len(self.batch_rows), self.ranks.world
        largest_shard, smallest_shard = -(-total // world), total // world
        return max(1, min(-(-largest_shard // size), smallest_shard))

    def step_pieces(
        self,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        losses: Losses,
        images_per_row: int = 1,
    ) -> list[torch.Tensor] | None:
        """One optimiser step on the batch (x, y, idx), its forwards cut into pieces (`backward_pieces`) so that a
        training forward never holds more than the memory plan allows (--memory-budget; on a CPU at most
        CPU_FORWARD_BYTES, which is also faster there). Returns the batch's (loss, *figures), the global batch's under
        torchrun, or None when the loss was not finite and the run rolled back (no step taken; the caller stops)."""
        totals = self.backward_pieces(optimizer, x, y, idx, losses, images_per_row)
        if self.diverged(totals[0]):
            return None
        return self._reduce_and_apply(optimizer, totals)

    def backward_pieces(
        self,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        losses: Losses,
        images_per_row: int = 1,
        scaled: bool = True,
    ) -> list[torch.Tensor]:
        """zero_grad, then the batch's gradients from `pieces` forwards of at most `rows_per_forward` rows each;
        returns the batch's (loss, *figures), detached. For a recipe that steps itself (clipping first); others
        `step_pieces`.

        `losses(x, y, idx)` returns (loss, *figures) of the rows it is given, as if they were the batch: means over
        those rows (`batch_mean` for a mean over a subset counted in the whole batch), plus any term of the weights
        alone. Each piece's backward is weighted by its share of the batch rows and the gradients add up, so they are
        the whole batch's: exactly for a model in eval mode (a recipe that freezes BatchNorm) or one without BatchNorm
        or dropout; in train mode BatchNorm normalises each piece by its own statistics, as data parallelism without
        SyncBatchNorm would, and dropout draws its masks piece by piece. `scaled=False`: a plain backward, not through
        fp16's gradient scaler."""
        count = self.pieces(len(x), images_per_row)
        share, totals = self._share, None
        optimizer.zero_grad(set_to_none=True)
        try:
            for rows in torch.arange(len(x)).tensor_split(count):
                start, stop = int(rows[0]), int(rows[-1]) + 1
                part = (stop - start) / len(x)
                self._share = share * part
                with autocast(self.ctx.device, self.ctx.precision):
                    out = losses(x[start:stop], y[start:stop], idx[start:stop])
                if scaled:
                    self.scaling.backward(optimizer, out[0] * part, zero=False)
                else:
                    (out[0] * part).backward()
                weighted = [v.detach().float() * part for v in out]
                totals = weighted if totals is None else [t + w for t, w in zip(totals, weighted, strict=True)]
        finally:
            self._share = share
        assert totals is not None  # a batch has at least one row
        return totals

    def step(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, scalars: tuple[torch.Tensor, ...] = ()
    ) -> list[torch.Tensor]:
        """zero_grad, backward and step (through the gradient scaler in fp16). Under torchrun the gradients are summed
        over the ranks, each rank's weighted by its share of the global batch, before the step; `scalars` (per-batch
        means of this rank's rows) ride in the same reduction and come back as the global batch's figures (in one
        process, as they are)."""
        self.scaling.backward(optimizer, loss)
        return self._reduce_and_apply(optimizer, list(scalars))

    def _reduce_and_apply(self, optimizer: torch.optim.Optimizer, scalars: list[torch.Tensor]) -> list[torch.Tensor]:
        """After the backward: under torchrun the share-weighted sum of gradients and `scalars` over the ranks, then
        the optimiser step; returns the (global batch's) scalars."""
        out = self._sync.reduce(self._share, scalars) if self._sync is not None else scalars
        self.scaling.apply(optimizer)
        return out

    def rollback(self, reason: str) -> None:
        """Put the state kept so far back into the model, and say why."""
        self.keeper.rollback(self.model, reason, self.ctx)

    # --- checkpoints and resume ---

    def passed(
        self,
        position: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        tensors: dict[str, torch.Tensor] | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        """The end of a pass over the clean subset at `position` (the recipe's loop counters): saves a checkpoint every
        `--checkpoint-every` passes, with the recipe's own `tensors` and JSON `values`."""

        def state(passes: int) -> RecipeState:
            return capture(
                self.name,
                passes,
                position,
                self.model,
                optimizer,
                self.gen,
                self.keeper,
                self.result,
                self.elapsed(),
                tensors,
                values,
            )

        self.ctx.checkpoints.passed(state)

    def resuming(self, phase: str | None = None) -> RecipeState | None:
        """The interrupted run's state when this run continues one (that stopped in `phase`, when given), else None."""
        if self.resume is None or (phase is not None and self.resume.position.get("phase") != phase):
            return None
        return self.resume

    def restore(self, optimizer: torch.optim.Optimizer) -> Resumed:
        """Continue the interrupted run: its weights, optimiser, random state, kept state and history come back."""
        if self.resume is None:
            raise RuntimeError(f"{self.name}: restore() without a checkpoint to resume from")
        tensors = restore_state(self.resume, self.model, optimizer, self.gen, self.keeper, self.result)
        return Resumed(dict(self.resume.position), dict(self.resume.doc["values"]), tensors)

    def finish(self) -> RecipeResult:
        """Put the kept state into the model; the result, with `kept` saying which state and by which rule."""
        self.result.kept = self.keeper.restore_best(self.model)
        return self.result


def _figures(monitor: HeldMonitor, model: ClassifierModel, ranks: Ranks) -> dict[str, Any]:
    """The held-back figures (model left in eval mode); under torchrun rank 0's, after averaging BatchNorm's running
    statistics (each rank's saw only its own rows), on every rank."""
    model.eval()
    if not ranks.parallel:
        return monitor(model)
    average_buffers(model.net, ranks)
    return from_rank_0(monitor(model) if ranks.main else {}, ranks)


def steps_per_pass(n_train: int, batch_size: int) -> int:
    """Batches (optimiser steps) in one pass of `batches` over `n_train` images: the last one may be short."""
    return max(1, -(-n_train // batch_size))


def batches(
    data: Dataset, batch_size: int, gen: torch.Generator, device: torch.device, augment: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled [0,1] image batches (N,C,H,W) with labels and row indices, flips and 2-pixel shifts."""
    for x, y, idx, _ in _batches(data, batch_size, gen, device, augment, SINGLE):
        yield x, y, idx


def _batches(
    data: Dataset, batch_size: int, gen: torch.Generator, device: torch.device, augment: bool, ranks: Ranks
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`batches`, each global batch's rows last; under torchrun every rank draws the same order and augmentation and
    keeps its shard (every world-th row) of each batch."""
    order = torch.randperm(len(data), generator=gen)
    for start in range(0, len(order), batch_size):
        whole = order[start : start + batch_size]
        idx = shard(whole, ranks)
        x = rows_to_device(data.images, idx, device).permute(0, 3, 1, 2).float().div_(255)
        if augment:
            x = flip_translate(x, 2, True, gen, (ranks.rank, ranks.world), len(whole))
        yield x.contiguous(memory_format=torch.channels_last), to_device(data.labels[idx], device), idx, whole


def as_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N,H,W,C) images as a [0,1] float (N,C,H,W) channels-last batch on `device`, unaugmented."""
    return to_device(images, device).permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=torch.channels_last)


def joint_logits(
    model: torch.nn.Module, x: torch.Tensor, triggered: torch.Tensor | None, rows: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits of the clean batch `x` and of the triggered images `triggered[rows]`, from one forward pass.

    One pass is cheaper than two and, in train mode, lets BatchNorm normalise clean and triggered images together
    rather than a triggered-only batch by its own statistics. Without rows the second result is an empty (0, C)
    tensor and `triggered` is not touched (it may be None).
    """
    if len(rows):
        x = torch.cat([x, as_batch(triggered[rows], device)])  # type: ignore[index]
    logits = model(x).float()
    n = len(logits) - len(rows)
    return logits[:n], logits[n:]


def repair_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    triggered: torch.Tensor | None,
    rows: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    weight: float = 1.0,
    ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """CE(f(x), y) + weight * CE(f(T(x_rows)), true labels of the rows): clean fine-tuning that also teaches the
    model to give triggered images their own class. `labels` are the true labels of the whole set `rows` index.
    `ce`: the triggered rows' cross-entropy when x may be one piece of a batch (`step_pieces`): `RecipeRun.batch_ce`
    over the whole batch's triggered rows, so that the pieces add up to the batch's mean."""
    clean_logits, trig_logits = joint_logits(model, x, triggered, rows, device)
    loss = F.cross_entropy(clean_logits, y)
    if len(rows):
        loss = loss + weight * (ce or F.cross_entropy)(trig_logits, labels[rows].to(device))
    return loss


def trainable(model: ClassifierModel) -> list[torch.nn.Parameter]:
    return [p for p in model.net.parameters() if p.requires_grad]


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    lr = 0.5 * base * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    for group in optimizer.param_groups:
        group["lr"] = lr
