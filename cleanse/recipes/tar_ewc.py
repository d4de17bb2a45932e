"""`tar-ewc`: Grad-CAM-monitored unlearning with an EWC anchor, then recovery.

Phase 1 minimises, per batch of clean images (x, y) and the triggered copies T(x)
of those whose class is not the target y_t:

    L = CE(f(x), y) - mean(min(CE(f(T(x)), y_t), tau)) + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2

The clamp at tau bounds the ascent per sample, so it cannot diverge: once a
triggered image's loss toward the target exceeds tau it stops pushing. F is the
empirical Fisher (mean over clean samples of squared per-sample gradients of
log p(y|x), eval mode, parameters only), normalised by its mean so lambda is
scale-free; theta* are the start weights. Phase 1 stops once held-back ASR
falls below `asr_stop`. Phase 2 fine-tunes on the clean subset to restore CA,
keeping the bounded ascent (weight `recovery_ascent`) but not the EWC anchor,
which points at the backdoored weights. Held-back CA, ASR and TAR are measured and shown
after every phase-1 check and every phase-2 epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from cleanse.attacks.trigger import Trigger
from cleanse.engine.device import LaggedScalar
from cleanse.engine.distributed import SINGLE, Ranks, all_sum, shard
from cleanse.errors import CleanseError
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    as_batch,
    cosine_lr,
    joint_logits,
    register,
    steps_per_pass,
    trainable,
)

FISHER_CHUNK_BYTES = 256 * 2**20  # per-sample gradients held at once by the automatic fisher_chunk


def fisher_chunk(model: torch.nn.Module, given: int = 0, rows_per_forward: int | None = None) -> int:
    """Samples whose gradients the Fisher holds at once: `given`, or (0) as many as fit in 256 MiB of float32
    per-sample gradients, at most 32 (the `cnn`: 32; ResNet-50: 2; ViT-B/16: 1), and at most the rows one training
    forward may hold (`rows_per_forward`, from unlearn's memory plan: the chunk's activations are the other half of
    its footprint, 19 MiB an image for a small `cnn` at 224 pixels)."""
    if given > 0:
        return given
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    chunk = max(1, min(32, FISHER_CHUNK_BYTES // max(1, 4 * count)))
    return chunk if rows_per_forward is None else max(1, min(chunk, rows_per_forward))


def empirical_fisher(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 32,
    ranks: Ranks = SINGLE,
    total: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean of squared per-sample gradients of log p(y|x), normalised by its mean.

    `images`: float (N,C,H,W) in [0,1], or uint8 (N,H,W,C) as a Dataset stores them, made float a chunk at a time.
    Under torchrun `images` are this rank's share of the `total` samples; the sums are added over the ranks.

    Per-sample gradients come from vmap over functional_call. Attention runs on the math kernel of
    scaled_dot_product_attention here, which vmap batches (the fused CPU kernels have no batching rule); the few ops
    that vmap still runs one sample at a time (Swin's pooling of a permuted map) give the same figures, so their
    "performance drop" warnings are not shown.
    """
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def log_prob(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**ps, **frozen}, buffers), (x.unsqueeze(0),))
        return F.log_softmax(out, dim=1)[0].gather(0, y.view(1))[0]

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk]
            if x.dtype == torch.uint8:  # (N,H,W,C) as stored: a float copy of one chunk at a time, not of every sample
                x = x.permute(0, 3, 1, 2).float().div(255)
            g = per_sample(params, x, labels[start : start + chunk])
            for n in names:
                fisher[n] += g[n].pow(2).sum(0)
    fisher = {n: all_sum(f, ranks) for n, f in fisher.items()}
    samples = len(images) if total is None else total
    summed = torch.stack([f.sum() for f in fisher.values()]).sum()
    count = sum(f.numel() for f in fisher.values())
    mean = (summed / (samples * count)).clamp_min(1e-30)
    return {n: f / samples / mean for n, f in fisher.items()}


@dataclass(frozen=True)
class _Ascent:
    """The training part of the subset seen through the trigger: every image's triggered copy (uint8), which rows are
    eligible (class other than the target) and each row's target label."""

    triggered: torch.Tensor
    eligible: torch.Tensor
    targets: torch.Tensor


@register
class TarEwc(Recipe):
    name = "tar-ewc"
    summary = (
        "bounded gradient ascent on the trigger + clean CE + EWC anchor, early stop on held-back ASR, then recovery"
    )
    needs_trigger = True
    resumable = True
    data_parallel = True
    steps_in_pieces = True
    params = {
        "epochs": Param(5, "phase 1 budget: at most this many passes over the clean subset"),
        "lr": Param(0.001, "phase 1 SGD learning rate (momentum 0.9)"),
        "tau": Param(
            3.0,
            "bound on each triggered sample's ascended loss (3.0: target probability below 5%; "
            "1.0 on transformer-style nets: below 37%)",
            transformer=1.0,
        ),
        "ewc_lambda": Param(1.0, "EWC strength on the mean-normalised Fisher"),
        "asr_stop": Param(0.01, "stop phase 1 once held-back ASR is at or below this"),
        "reversed_min_epochs": Param(
            1.0,
            "with a trigger reversed by `cleanse scan`: phase 1 runs at least this many passes "
            "before the asr_stop rule applies or a state is kept (a reversed trigger stops "
            "working well before the true one does)",
        ),
        "checks_per_epoch": Param(4, "held-back checks (and live-table rows) per phase-1 epoch"),
        "check_batch_asr": Param(
            0.05,
            "also check right after a step whose batch of triggered images reaches the target at "
            "most this often (at most checks_per_epoch such checks per epoch)",
            changed_default_when_added=True,
        ),
        "recovery_epochs": Param(2, "phase 2: clean fine-tuning epochs"),
        "recovery_lr": Param(0.001, "phase 2 SGD learning rate (cosine schedule)"),
        "recovery_ascent": Param(1.0, "weight of the bounded ascent kept during phase 2 (0: plain fine-tuning)"),
        "fisher_samples": Param(512, "clean samples used for the Fisher"),
        "fisher_chunk": Param(
            0,
            "per-sample gradients held at once for the Fisher (0: as many as fit in 256 MiB, at most 32 and at most "
            "the rows unlearn's memory plan gives one forward)",
        ),
        "batch_size": Param(64, "batch size"),
        "ca_margin": Param(0.02, "kept state: held-back CA within this of the start"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start"),
        "freeze_bn": Param(True, "keep BatchNorm statistics fixed (eval mode) in both phases"),
    }

    @staticmethod
    def _losses(
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        data: _Ascent,
        tau: float,
        run: RecipeRun,
        together: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CE(f(x), y), the bounded ascent mean over the batch's eligible rows of min(CE(f(T(x)), y_t), tau) (zero
        without eligible rows), and the share of the batch's triggered images still sent to the target (1.0 without
        eligible rows). `idx` are this process's rows of the batch: under torchrun a rank's share of the global batch
        (RecipeRun.batch_rows, RecipeRun.batch_mean); in one process all of them.

        `together` runs clean and triggered images through one forward pass: exactly the same figures when BatchNorm
        statistics are frozen, and cheaper than two passes. In train mode they stay two passes, so each batch is
        normalised by its own statistics, as before.
        """
        device, triggered, targets = run.ctx.device, data.triggered, data.targets
        rows, count = idx[data.eligible[idx]], int(data.eligible[run.batch_rows].sum())
        if len(rows) == 0:  # none here; under torchrun another rank may have some (count > 0): it adds them
            zero, one = torch.zeros((), device=device), torch.ones((), device=device)
            return F.cross_entropy(model(x).float(), y), zero, one if count == 0 else zero
        yt = targets[rows].to(device)
        if together:
            clean_logits, trig_logits = joint_logits(model, x, triggered, rows, device)
        else:
            clean_logits, trig_logits = model(x).float(), model(as_batch(triggered[rows], device)).float()
        ascent = run.batch_mean(F.cross_entropy(trig_logits, yt, reduction="none").clamp(max=tau), count)
        hits = run.batch_mean((trig_logits.detach().argmax(1) == yt).float(), count)
        return F.cross_entropy(clean_logits, y), ascent, hits

    def check(self, params: dict[str, Any], trigger: Trigger | None) -> None:
        if trigger is not None and trigger.origin == "scan" and params["reversed_min_epochs"] > params["epochs"]:
            raise CleanseError(
                f"tar-ewc: reversed_min_epochs={params['reversed_min_epochs']:g} is more than "
                f"epochs={params['epochs']}, so phase 1 could never keep a state with this reversed trigger; "
                "raise --epochs or lower --param reversed_min_epochs"
            )

    def run(self, ctx: RecipeContext) -> RecipeResult:
        p = ctx.params
        self.check(p, ctx.trigger)
        run = RecipeRun.begin(self, ctx, asr_good=p["asr_stop"])
        trigger, train = ctx.trigger, ctx.clean.train
        assert trigger is not None  # begin() refused a missing one
        ewc = self._ewc(run)
        run.result.extra["fisher_seconds"] = run.elapsed()
        data = _Ascent(
            trigger.apply_uint8(train.images),
            trigger.eligible(train.labels),
            trigger.target_labels(train.labels, train.num_classes),
        )
        step = self._unlearn(run, data, ewc)
        run.result.extra["unlearn_steps"] = step
        self._recover(run, data, step)
        return run.finish()

    @staticmethod
    def _ewc(run: RecipeRun) -> Callable[[], torch.Tensor]:
        """sum_i F_i (theta_i - theta*_i)^2 with the Fisher F of the start weights theta* on the clean subset."""
        ctx, p, model, train = run.ctx, run.ctx.params, run.model, run.ctx.clean.train
        n_fisher = min(p["fisher_samples"], len(train))
        mine = shard(torch.arange(n_fisher), run.ranks)  # under torchrun each rank takes its share of the samples
        fx = train.images[mine].to(ctx.device)  # uint8: empirical_fisher makes each chunk float
        chunk = fisher_chunk(model, p["fisher_chunk"], run.rows_per_forward())
        fisher = empirical_fisher(model, fx, train.labels[mine].to(ctx.device), chunk, run.ranks, n_fisher)
        # Cap the curvature lambda*F at 1/lr: plain SGD on a quadratic diverges when lr*lambda*F_i > 2,
        # and the mean-normalised Fisher has entries thousands of times its mean.
        cap = 1.0 / (p["lr"] * max(p["ewc_lambda"], 1e-12))
        fisher = {n: f.clamp(max=cap) for n, f in fisher.items()}
        anchor = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}

        def penalty() -> torch.Tensor:
            total = torch.zeros((), device=ctx.device)
            for n, q in model.named_parameters():
                if q.requires_grad:
                    total = total + (fisher[n] * (q - anchor[n]).pow(2)).sum()
            return total

        return penalty

    def _unlearn(self, run: RecipeRun, data: _Ascent, ewc: Callable[[], torch.Tensor]) -> int:
        """Phase 1: bounded ascent + clean CE + EWC, checked on the held-back images; returns the steps taken."""
        ctx, p, model, train = run.ctx, run.ctx.params, run.model, run.ctx.clean.train
        trigger = ctx.trigger
        assert trigger is not None
        optimizer = torch.optim.SGD(trainable(model), lr=p["lr"], momentum=0.9, nesterov=True)
        steps_per_epoch = steps_per_pass(len(train), p["batch_size"])
        check_every = max(1, steps_per_epoch // max(1, p["checks_per_epoch"]))
        # A reversed trigger's held-back ASR reaches 0 long before the true trigger breaks, so no state counts before
        # min_steps (measured: docs/recipes/tar-ewc.md, "With a reversed trigger").
        min_steps = math.ceil(p["reversed_min_epochs"] * steps_per_epoch) if trigger.origin == "scan" else 0
        run.result.extra["min_unlearn_steps"] = min_steps
        if min_steps and not run.resuming():
            ctx.note(f"reversed trigger: phase 1 runs at least {min_steps} steps before its held-back ASR can stop it")
        step, first = 0, 1
        saved = run.resuming()
        if saved is not None and saved.position["phase"] != "unlearn":
            return int(saved.position["step"])  # phase 1 was over
        if saved is not None:
            at = run.restore(optimizer).position
            step, first = at["step"], at["epoch"] + 1
        batch_hits = LaggedScalar(ctx.device)  # the batch's ASR, read by the host one step late on accelerators
        for epoch in range(first, p["epochs"] + 1):
            batch_checks = 0
            for x, y, idx in run.batches(train, p["batch_size"]):
                model.train(not p["freeze_bn"])

                def losses(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    clean_ce, ascent, hits = self._losses(
                        model, x, y, idx, data, p["tau"], run, together=p["freeze_bn"]
                    )
                    penalty = ewc()
                    return clean_ce - ascent + 0.5 * p["ewc_lambda"] * penalty, clean_ce, ascent, hits, penalty

                # a clean row and its triggered copy go through the model; under torchrun the figures come back as
                # the global batch's, so every rank decides alike
                stepped = run.step_pieces(optimizer, x, y, idx, losses, images_per_row=2)
                if stepped is None:
                    return step
                loss, clean_ce, ascent, hits, penalty = stepped
                step += 1
                batch_asr = batch_hits.exchange(hits)
                # A held-back check on the schedule, and also as soon as this batch's triggered images have (nearly)
                # stopped reaching the target: the backdoor often breaks within a few steps, and every step past that
                # point costs clean accuracy that recovery must win back. The batch threshold is looser than asr_stop
                # since one hit in a batch of ~60 triggered images is already 1.7% (docs/recipes/tar-ewc.md,
                # `check_batch_asr`). Before min_steps (reversed triggers) no state counts.
                settled = step >= min_steps
                scheduled = step % check_every == 0 or step == min_steps
                by_batch = (
                    not scheduled
                    and settled
                    and batch_asr is not None
                    and batch_asr <= p["check_batch_asr"]
                    and batch_checks < p["checks_per_epoch"]
                )
                if not (scheduled or by_batch):
                    continue
                batch_checks += int(by_batch)
                metrics = run.measure()
                run.row(
                    "unlearn",
                    round(step / steps_per_epoch, 2),
                    loss=float(loss.detach()),
                    clean_ce=float(clean_ce.detach()),
                    ascent=float(ascent.detach()),
                    ewc=float(penalty.detach()),
                    batch_asr=batch_asr,
                    **metrics,
                )
                if run.judge(metrics, f"unlearn step {step}" if settled else None):
                    return step
                if settled and metrics["attack_success_rate"] <= p["asr_stop"]:
                    ctx.note(
                        f"held-back ASR {metrics['attack_success_rate']:.3f} <= {p['asr_stop']}: "
                        f"phase 1 stops at step {step}"
                    )
                    return step
            run.passed({"phase": "unlearn", "epoch": epoch, "step": step, "rstep": 0}, optimizer)
        return step

    def _recover(self, run: RecipeRun, data: _Ascent, step: int) -> None:
        """Phase 2: recovery on the clean subset, from where phase 1 stopped (or the state a rollback restored)."""
        ctx, p, model, train = run.ctx, run.ctx.params, run.model, run.ctx.clean.train
        optimizer = torch.optim.SGD(
            trainable(model), lr=p["recovery_lr"], momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        total = p["recovery_epochs"] * steps_per_pass(len(train), p["batch_size"])
        rstep, first = 0, 1
        if run.resuming("recover"):
            at = run.restore(optimizer).position
            rstep, first = at["rstep"], at["epoch"] + 1
        for epoch in range(first, p["recovery_epochs"] + 1):
            model.train(not p["freeze_bn"])
            for x, y, idx in run.batches(train, p["batch_size"]):
                cosine_lr(optimizer, p["recovery_lr"], rstep, total)

                def losses(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    if p["recovery_ascent"]:
                        clean_ce, ascent, _ = self._losses(
                            model, x, y, idx, data, p["tau"], run, together=p["freeze_bn"]
                        )
                    else:
                        clean_ce, ascent = F.cross_entropy(model(x).float(), y), torch.zeros((), device=ctx.device)
                    # No EWC here: it anchors to the backdoored start weights and would pull the backdoor back. The
                    # bounded ascent stays (weight recovery_ascent): without it the backdoor came back
                    # (docs/recipes/tar-ewc.md, step 3).
                    return clean_ce - p["recovery_ascent"] * ascent, clean_ce, ascent

                stepped = run.step_pieces(optimizer, x, y, idx, losses, images_per_row=2)
                if stepped is None:
                    return  # the loss was not finite: the run rolled back to the state kept so far, and stops
                loss, clean_ce, ascent = stepped
                rstep += 1
            metrics = run.measure()
            run.row(
                "recover",
                epoch,
                loss=float(loss.detach()),
                clean_ce=float(clean_ce.detach()),
                ascent=float(ascent.detach()),
                **metrics,
            )
            run.offer(metrics, f"recover epoch {epoch}")
            run.passed({"phase": "recover", "epoch": epoch, "step": step, "rstep": rstep}, optimizer)
