"""The training loop: batched augmentation, a one-cycle style schedule, label smoothing.

Defaults for `cnn` follow airbench94 (Nesterov SGD, momentum 0.85, a triangular
learning-rate schedule, label smoothing 0.2, 64x learning rate on BatchNorm
biases, a frozen whitening layer whose bias trains for the first 3 epochs, and
lookahead weight averaging every 5 steps). Transformer-style networks (any
LayerNorm or MultiheadAttention, no BatchNorm: ViT, Swin, ConvNeXt) get AdamW
as DeiT and ConvNeXt train them (weight decay 0.05 on weights of two or more
dimensions, none on biases and norm parameters; peak lr 1e-3 x B/512). Other
architectures get a conventional setting (Nesterov SGD, momentum 0.9, weight
decay 5e-4). Label smoothing 0.1 for both.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cleanse.attacks.trigger import Trigger
from cleanse.data.dataset import Dataset
from cleanse.engine.augment import flip_translate
from cleanse.engine.device import GradScaling, LaggedScalar, autocast, rows_to_device, wide_float
from cleanse.engine.distributed import (
    GradientSync,
    Ranks,
    all_sum,
    average_buffers,
    check_batch,
    current,
    shard,
    sync_batchnorm,
)
from cleanse.engine.evaluate import TriggeredSet, evaluate
from cleanse.engine.events import Callback, Event, silent
from cleanse.engine.snapshot import pack_optimizer, pack_rng, restore_optimizer, restore_rng
from cleanse.errors import CleanseError
from cleanse.files import write_safetensors
from cleanse.formats import FileFormat
from cleanse.models import ClassifierModel

_NOT_RESUME = "{path}: not a training checkpoint written by cleanse train --checkpoint-every; rerun without --resume"
RESUME_FILE = FileFormat(
    "cleanse.train-resume",
    1,
    wrong_format=_NOT_RESUME,
    no_metadata=_NOT_RESUME,
    wrong_version="{path}: checkpoint format version {version} is not supported; rerun without --resume",
)
# TrainConfig fields a user sets on the command line, for naming a disagreement with a resume file
_CONFIG_FLAGS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "optimizer": "--optimizer",
    "precision": "--precision",
    "seed": "--seed",
    "init_whitening": "--init",
}


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int | None = None  # None: 512 for 20,000+ images, else 256 (enough steps on small sets)
    lr: float | None = None  # peak learning rate for the mean loss; None: the architecture's default
    optimizer: str | None = None  # "sgd" | "adamw"; None: the architecture's default
    momentum: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    bias_lr_scale: float | None = None
    warmup_frac: float = 0.23
    lookahead: bool | None = None
    whiten_bias_epochs: int = 3
    translate: int = 2
    flip: bool = True
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 1
    monitor_size: int = 2000  # per-epoch CA/ASR on a fixed sample of --test; the final figures use all of it
    init_whitening: bool = True  # set the cnn's whitening filters from the data (off when continuing from weights)

    def resolved(self, airbench: bool, n: int, transformer: bool = False) -> ResolvedConfig:
        """Fill data- and architecture-dependent defaults (airbench-style for `cnn`, AdamW for transformers)."""
        batch_size = self.batch_size or (512 if n >= 20000 else 256)
        if airbench:
            defaults = dict(
                optimizer="sgd",
                lr=1.5 * batch_size / 1024,
                momentum=0.85,
                weight_decay=1.33e-3,
                label_smoothing=0.2,
                bias_lr_scale=64.0,
                lookahead=True,
            )
        elif transformer or self.optimizer == "adamw":
            defaults = dict(
                optimizer="adamw",
                lr=1e-3 * batch_size / 512,
                momentum=0.9,  # AdamW's beta1
                weight_decay=0.05,
                label_smoothing=0.1,
                bias_lr_scale=1.0,
                lookahead=False,
            )
        else:
            defaults = dict(
                optimizer="sgd",
                lr=0.1 * batch_size / 256,
                momentum=0.9,
                weight_decay=5e-4,
                label_smoothing=0.1,
                bias_lr_scale=1.0,
                lookahead=False,
            )
        values = asdict(self)
        values["batch_size"] = batch_size
        values.update({k: v for k, v in defaults.items() if values[k] is None})
        return ResolvedConfig(**values)


@dataclass
class ResolvedConfig(TrainConfig):
    """A TrainConfig whose data- and architecture-dependent defaults are filled in (TrainConfig.resolved)."""

    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    bias_lr_scale: float = 1.0
    lookahead: bool = False


def lr_multiplier(step: int, total: int, warmup_frac: float) -> float:
    """Triangular one-cycle: 0.2 -> 1 over the warm-up, then linearly down to 0.07 (airbench94)."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        frac = step / warmup
        return 0.2 * (1 - frac) + frac
    frac = (step - warmup) / max(1, total - warmup)
    return (1 - frac) + 0.07 * frac


class Lookahead:
    """Pull the weights toward a slow exponential average every few steps (airbench94)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.ema[key].lerp_(value, 1 - decay)
                value.copy_(self.ema[key])


def is_transformer(net: torch.nn.Module) -> bool:
    """LayerNorm or attention and no BatchNorm: the networks trained with AdamW (ViT, Swin, ConvNeXt)."""
    kinds = tuple(type(m) for m in net.modules())
    has_bn = any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)
    return not has_bn and any(issubclass(k, (torch.nn.LayerNorm, torch.nn.MultiheadAttention)) for k in kinds)


def _param_groups(model: ClassifierModel, cfg: ResolvedConfig) -> list[dict[str, Any]]:
    norm_biases: list[torch.nn.Parameter] = []
    others: list[torch.nn.Parameter] = []
    if cfg.optimizer == "adamw":  # no weight decay on biases and norm parameters (DeiT, ConvNeXt)
        decayed = [p for p in model.net.parameters() if p.requires_grad and p.dim() > 1]
        plain = [p for p in model.net.parameters() if p.requires_grad and p.dim() <= 1]
        return [
            {"params": group, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": wd}
            for group, wd in ((decayed, cfg.weight_decay), (plain, 0.0))
            if group
        ]
    for name, p in model.net.named_parameters():
        if not p.requires_grad:
            continue
        is_norm_bias = p.dim() == 1 and "norm" in name and name.endswith("bias")
        (norm_biases if is_norm_bias and cfg.bias_lr_scale != 1 else others).append(p)
    groups = [{"params": others, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if norm_biases:
        scaled = cfg.lr * cfg.bias_lr_scale
        groups.append(
            {
                "params": norm_biases,
                "lr": scaled,
                "base_lr": scaled,
                "weight_decay": cfg.weight_decay / cfg.bias_lr_scale,
            }
        )
    return groups


def _monitor_sample(
    test: Dataset | None, triggered: TriggeredSet | None, size: int, seed: int
) -> tuple[Dataset | None, TriggeredSet | None]:
    """A fixed random sample of the test set (and its triggered copies) for the per-epoch table."""
    if test is None or len(test) <= size:
        return test, triggered
    gen = torch.Generator().manual_seed(seed + 1)
    sample = test.subset(torch.randperm(len(test), generator=gen)[:size].sort().values)
    if triggered is None:
        return sample, None
    pick = torch.randperm(len(triggered.images), generator=gen)[:size].sort().values
    return sample, TriggeredSet(triggered.images[pick], triggered.true_labels[pick], triggered.target_labels[pick])


@dataclass
class TrainState:
    """Everything needed to continue training after `epoch` exactly as if it had never stopped."""

    epoch: int  # epochs completed
    step: int  # optimiser steps taken
    history: list[dict[str, Any]]
    config: dict[str, Any]  # the resolved TrainConfig
    tensors: dict[str, torch.Tensor]  # model.*, optimizer.<param index>.<name>, lookahead.*, rng.*
    optimizer: dict[str, Any]  # param_groups and the non-tensor per-parameter state
    elapsed: float  # training seconds before the checkpoint
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # the caller's own facts (data, architecture), checked on resume


def _capture(
    model: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    lookahead: Lookahead | None,
    gen: torch.Generator,
    scaling: GradScaling,
    epoch: int,
    step: int,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
    elapsed: float,
) -> TrainState:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.net.state_dict().items()}
    optimizer_tensors, optimizer_doc = pack_optimizer(optimizer)
    tensors.update(optimizer_tensors)
    if lookahead is not None:
        tensors.update({f"lookahead.{k}": v.clone() for k, v in lookahead.ema.items()})
    tensors.update(pack_rng(gen, model.device))
    tensors.update(scaling.state())
    return TrainState(epoch, step, copy.deepcopy(history), asdict(cfg), tensors, optimizer_doc, elapsed)


def _restore(
    state: TrainState,
    model: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    lookahead: Lookahead | None,
    gen: torch.Generator,
    scaling: GradScaling,
) -> None:
    """Put the checkpointed weights, optimiser, lookahead and random states back; a file that does not fit exits 2."""
    try:
        model.net.load_state_dict(
            {k[len("model.") :]: v for k, v in state.tensors.items() if k.startswith("model.")}, strict=True
        )
        restore_optimizer(optimizer, state.tensors, state.optimizer)
        if lookahead is not None:
            ema = {k[len("lookahead.") :]: v for k, v in state.tensors.items() if k.startswith("lookahead.")}
            if set(ema) != set(lookahead.ema):
                raise KeyError("lookahead")
            lookahead.ema = {k: ema[k].to(lookahead.ema[k].device, lookahead.ema[k].dtype) for k in lookahead.ema}
        restore_rng(state.tensors, gen, model.device)
        scaling.restore(state.tensors)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise CleanseError(
            f"the resume checkpoint does not fit this model or optimiser ({type(exc).__name__}: {reason}); "
            "rerun without --resume (or with --force) to start over"
        ) from None


def check_resume_config(state: TrainState, cfg: TrainConfig) -> None:
    """The checkpoint was written by a run with these exact settings; anything else would not give the same result."""
    current = asdict(cfg)
    for key in sorted(set(current) | set(state.config)):
        if current.get(key) != state.config.get(key):
            flag = _CONFIG_FLAGS.get(key, key)
            raise CleanseError(
                f"the resume checkpoint was written with {flag} {state.config.get(key)!r}, this run has "
                f"{current.get(key)!r}; rerun with the same options as the interrupted run, or without --resume"
            )


def save_train_state(path: str | Path, state: TrainState) -> None:
    """A resumable checkpoint: tensors + JSON metadata in safetensors (never pickle), written atomically."""
    doc = {
        **RESUME_FILE.header(),
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "config": state.config,
        "optimizer": state.optimizer,
        "elapsed": state.elapsed,
        "extra": state.extra,
    }
    write_safetensors(path, state.tensors, doc)


def load_train_state(path: str | Path) -> TrainState:
    """Read and check a resume checkpoint written by save_train_state."""
    tensors, doc = RESUME_FILE.read(path)
    epoch, step, elapsed = doc.get("epoch"), doc.get("step"), doc.get("elapsed")
    optimizer, history, config, extra = (
        doc.get("optimizer"),
        doc.get("history"),
        doc.get("config"),
        doc.get("extra", {}),
    )
    ok = (
        isinstance(epoch, int)
        and not isinstance(epoch, bool)
        and epoch >= 1
        and isinstance(step, int)
        and step >= 0
        and isinstance(elapsed, (int, float))
        and isinstance(history, list)
        and all(isinstance(r, dict) for r in history)
        and len(history) == epoch
        and isinstance(config, dict)
        and isinstance(extra, dict)
        and isinstance(optimizer, dict)
        and isinstance(optimizer.get("param_groups"), list)
        and isinstance(optimizer.get("scalars"), dict)
        and "rng.generator" in tensors
        and "rng.torch" in tensors
    )
    if not ok:
        raise CleanseError(
            f"{path}: the training checkpoint is damaged (malformed metadata); rerun without --resume to start over"
        )
    # checked above; indexing again gives the checker the values' types
    return TrainState(
        doc["epoch"],
        doc["step"],
        doc["history"],
        doc["config"],
        tensors,
        doc["optimizer"],
        float(doc["elapsed"]),
        doc.get("extra", {}),
    )


def _check_finite(loss: float | None, epoch: int) -> None:
    if loss is not None and not math.isfinite(loss):
        raise CleanseError(f"training diverged at epoch {epoch} (loss {loss}); lower --lr")


def train_model(
    model: ClassifierModel,
    data: Dataset,
    config: TrainConfig,
    test: Dataset | None = None,
    trigger: Trigger | None = None,
    callback: Callback = silent,
    resume: TrainState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Train `model` in place on `data`; evaluate on `test` each epoch. Returns the history and final metrics.

    Every `checkpoint_every` epochs (not after the last) `on_checkpoint` receives a TrainState; passing it back as
    `resume` with the same data and config continues to the same weights as an uninterrupted run.

    Under torchrun (`ranks`, default: the process group joined, if any) each rank trains on its shard of every global
    batch with gradients summed over ranks (engine.distributed); only rank 0 evaluates, calls `callback` with figures
    and checkpoints.
    """
    if data.num_classes != model.spec.num_classes:
        raise CleanseError(
            f"the data has {data.num_classes} classes but the model has {model.spec.num_classes}; "
            "use matching data or --num-classes"
        )
    device = model.device
    airbench = hasattr(model.net, "init_from_data")
    cfg = config.resolved(airbench, len(data), is_transformer(model.net))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # drop the last partial batch, as airbench does
    total = steps_per_epoch * cfg.epochs
    ranks = ranks or current()
    check_batch(batch, ranks)
    images = data.images  # stays on the CPU (it may be memory-mapped): each batch is gathered there and moved alone
    labels = data.labels.to(device)

    if resume is not None:
        check_resume_config(resume, cfg)
        if resume.epoch >= cfg.epochs:
            raise CleanseError(
                f"the resume checkpoint is after epoch {resume.epoch} of {cfg.epochs}; nothing is left to train"
            )
    if airbench and cfg.init_whitening and resume is None:
        sample = images[torch.randperm(n, generator=gen)[:5000]].to(device).permute(0, 3, 1, 2).float().div(255)
        model.net.init_from_data((sample - model.mean) / model.std)  # type: ignore[operator]
    model.net = sync_batchnorm(model.net, device, ranks)
    model.to(memory_format=torch.channels_last)
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(_param_groups(model, cfg), betas=(cfg.momentum, 0.999))
    else:
        optimizer = torch.optim.SGD(_param_groups(model, cfg), momentum=cfg.momentum, nesterov=True)
    whiten_bias = getattr(getattr(model.net, "whiten", None), "bias", None)
    lookahead = Lookahead(model.net) if cfg.lookahead else None
    triggered = TriggeredSet.build(test, trigger) if (test is not None and trigger is not None) else None
    monitor, monitor_triggered = _monitor_sample(test, triggered, cfg.monitor_size, cfg.seed)

    scaling = GradScaling(device, cfg.precision)
    watch = LaggedScalar(device)
    gradients = GradientSync(model.net.parameters(), ranks)
    history: list[dict[str, Any]] = []
    step, first, before = 0, 1, 0.0
    if resume is not None:
        _restore(resume, model, optimizer, lookahead, gen, scaling)
        step, first, before, history = resume.step, resume.epoch + 1, resume.elapsed, copy.deepcopy(resume.history)
    callback(
        Event(
            "start",
            {
                "what": "train",
                "epochs": cfg.epochs,
                "first_epoch": first,
                "steps_per_epoch": steps_per_epoch,
                "config": asdict(cfg),
            },
        )
    )
    started = time.perf_counter() - before
    for epoch in range(first, cfg.epochs + 1):
        if whiten_bias is not None:
            whiten_bias.requires_grad_(epoch <= cfg.whiten_bias_epochs)
        model.train()
        order = torch.randperm(n, generator=gen)
        device_order = order.to(device)
        # running sums stay on the device; the host looks at the loss one step late on accelerators (LaggedScalar)
        loss_sum = torch.zeros((), dtype=wide_float(device), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for i in range(steps_per_epoch):
            idx = shard(device_order[i * batch : (i + 1) * batch], ranks)
            rows = rows_to_device(images, shard(order[i * batch : (i + 1) * batch], ranks), device)
            x = rows.permute(0, 3, 1, 2).float().div_(255)
            x = flip_translate(x, cfg.translate, cfg.flip, gen, (ranks.rank, ranks.world))
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            mult = lr_multiplier(step, total, cfg.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * mult
            with autocast(device, cfg.precision):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            scaling.backward(optimizer, loss)
            (global_loss,) = gradients.reduce(len(y) / batch, [loss])
            scaling.apply(optimizer)
            _check_finite(watch.exchange(global_loss), epoch)  # after the step: it stops the run either way
            step += 1
            if lookahead is not None and step % 5 == 0:
                lookahead.update(model.net, decay=0.95**5 * (step / total) ** 3)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        _check_finite(watch.latest(), epoch)
        if lookahead is not None and epoch == cfg.epochs:
            lookahead.update(model.net, decay=1.0)
        average_buffers(model.net, ranks)
        seen *= ranks.world  # every rank's shard of a global batch is the same size (check_batch)
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(all_sum(loss_sum, ranks)) / seen,
            "train_accuracy": int(all_sum(correct, ranks)) / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed": time.perf_counter() - started,
        }
        if not ranks.main:
            history.append(row)
            continue
        if epoch == cfg.epochs and test is not None:  # reported figures: fp32, like every other command
            metrics = evaluate(model, test, triggered=triggered)
            row.update({k: metrics[k] for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")})
            row["eval_images"] = len(test)
        elif monitor is not None and epoch % cfg.eval_every == 0:
            metrics = evaluate(model, monitor, precision=cfg.precision, triggered=monitor_triggered)
            row.update({k: metrics[k] for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")})
            row["eval_images"] = len(monitor)
        row["elapsed"] = time.perf_counter() - started
        history.append(row)
        callback(Event("row", row))
        if checkpoint_every and on_checkpoint is not None and epoch % checkpoint_every == 0 and epoch < cfg.epochs:
            elapsed = time.perf_counter() - started
            on_checkpoint(_capture(model, optimizer, lookahead, gen, scaling, epoch, step, history, cfg, elapsed))
    model.eval()
    train_seconds = time.perf_counter() - started
    final: dict[str, Any] = {"clean_accuracy": None, "attack_success_rate": None, "robust_accuracy": None}
    if test is not None:
        final = {k: history[-1].get(k) for k in final}
    callback(Event("end", {"wall_seconds": train_seconds}))
    return {"history": history, "metrics": final, "config": asdict(cfg), "train_seconds": train_seconds}
