"""Train backdoored/clean CIFAR-10 models with a plain SGD loop, outside cleanse's training defaults.

Every other benchmark model comes from `cleanse train` (airbench-style cnn, label smoothing, logit
scaling, Lookahead, ...). Detector thresholds must not be tuned to that one recipe, so this script trains a
second architecture (`vgg11-bn`, by default at width 0.25) with a textbook loop written here: SGD with
momentum 0.9 (not Nesterov), weight decay 5e-4 on every parameter, batch 128, cross-entropy without label
smoothing, random crop (zero pad 4) + horizontal flip, and a per-step cosine learning rate from 0.05 to 0,
for 15 epochs (about 8 minutes on one idle thread in bf16; WaNet 60, which it needs for ~84% ASR).
Normalisation is the usual CIFAR-10 mean/std, not one measured from the data.

    python -m benchmarks.plain_train --attack sig --target 3 --seed 0 [--arch vgg11-bn --width 0.25 --epochs E]
    python -m benchmarks.plain_train --attack clean --seed 0

Poisons 10% of the training set like train_cifar10 (SIG: clean-label, every class-3 image; WaNet: plus its
noise-mode rows, trained as they are), trains, evaluates in fp32 on the 10,000 test images (ASR on the
non-target ones), caches the model as benchmarks/cache/plain-<arch>-w<width>-<attack>-t<target>-s<seed>-<hash>
.safetensors (trigger beside it) and writes benchmarks/results/plain_train-<attack>-s<seed>.json.
Other benchmarks import `train_plain`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import CACHE, config_hash, file_digest, machine, poison_for, require_cifar, write_results
from cleanse.data import load_data
from cleanse.engine.device import autocast, resolve_precision
from cleanse.engine.evaluate import evaluate
from cleanse.models import PRESETS, ClassifierModel, load_model, new_model, save_model

RECIPE = "plain-sgd-v1"  # bump when the loop changes, so cached models are not reused across recipes
DEFAULT_ARCH = "vgg11-bn"
DEFAULT_WIDTH = 0.25
DEFAULT_EPOCHS = 15  # about 8 minutes on one idle thread (bf16, width 0.25)
# WaNet's warp is learnt slowly under crop+flip and its noise-mode rows: 15 epochs gave 47% ASR, 30 gave 77%.
ATTACK_EPOCHS = {"wanet": 60}
DEFAULT_RATE = 0.1
MONITOR_SIZE = 1000  # test images behind the per-epoch log line (the final figures use all 10,000)


def crop_flip(batch: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation of uint8 (B, H, W, C) images: random crop after zero padding by `pad`, random
    horizontal flip. Returns float (B, C, H, W) in [0, 1], channels_last."""
    b, h, w, c = batch.shape
    padded = F.pad(batch.permute(0, 3, 1, 2), (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return x.float().div_(255).contiguous(memory_format=torch.channels_last)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / total))


def step_lr(base: float, step: int, total: int) -> float:
    """x0.1 at 50% and 75% of training."""
    return base * (0.1 ** ((step >= total // 2) + (step >= 3 * total // 4)))


SCHEDULES = {"cosine": cosine_lr, "step": step_lr}


def plain_loop(
    model: ClassifierModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: dict[str, Any],
    precision: str,
    on_epoch: Callable[[ClassifierModel, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The training loop: uint8 (N, H, W, C) images and their (possibly poisoned) labels, every row as is."""
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"])
    device = model.device
    n, batch = len(images), config["batch_size"]
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * config["epochs"]
    schedule = SCHEDULES[config["schedule"]]
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    history: list[dict[str, Any]] = []
    step, started = 0, time.perf_counter()
    for epoch in range(1, config["epochs"] + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            x = crop_flip(images[idx], config["pad"], gen).to(device)
            y = labels[idx].to(device)
            lr = schedule(config["lr"], step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch} (loss {float(loss)})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "loss": loss_sum / n, "train_accuracy": correct / n}
        row["elapsed"] = time.perf_counter() - started
        if on_epoch is not None:
            on_epoch(model, row)  # may add monitor figures (and log); its time counts as training time
        history.append(row)
    model.eval()
    return history


def train_plain(
    attack: str,
    target: int,
    rate: float = DEFAULT_RATE,
    seed: int = 0,
    arch: str = DEFAULT_ARCH,
    width: float = DEFAULT_WIDTH,
    epochs: int | None = None,
    lr: float = 0.05,
    schedule: str = "cosine",
    batch_size: int = 128,
    precision: str = "auto",
    log: bool = True,
) -> dict[str, Any]:
    """Poison, train with the plain loop and evaluate (or reuse the cached model).

    Returns {"cached", "model", "model_sha256", "trigger" (None for clean), "metrics" (evaluate's, fp32, full
    test set), "train_seconds", "history" (when trained now), "config", "load_seconds", "poison_seconds",
    "precision"}. `epochs` defaults to ATTACK_EPOCHS[attack], else DEFAULT_EPOCHS."""
    if epochs is None:
        epochs = ATTACK_EPOCHS.get(attack, DEFAULT_EPOCHS)
    cifar = require_cifar()
    t0 = time.perf_counter()
    train = load_data(str(cifar / "train"))
    test = load_data(str(cifar / "test"))
    load_seconds = time.perf_counter() - t0
    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    arch_args = {"width": width} if arch == "vgg11-bn" else {}
    config = {
        "recipe": RECIPE,
        "attack": attack,
        "target": target if attack != "clean" else None,
        "rate": rate if attack != "clean" else None,
        "seed": seed,
        "arch": arch,
        "arch_args": arch_args,
        "epochs": epochs,
        "lr": lr,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": batch_size,
        "schedule": schedule,
        "pad": 4,
        "precision": precision,  # bf16 and fp32 training give different weights
    }
    tag = f"w{width:g}-" if arch_args else ""
    path = CACHE / f"plain-{arch}-{tag}{attack}-t{target}-s{seed}-{config_hash(config)}.safetensors"
    trigger_path = path.with_suffix(".trigger.safetensors")
    poisoned, trigger, poison_seconds = poison_for(train, attack, target, rate, seed)
    result: dict[str, Any]
    if path.is_file():
        model = load_model(path)
        result = {"cached": True, "train_seconds": model.spec.provenance.get("train_seconds")}
    else:
        mean, std = (list(v) for v in PRESETS["cifar10"])
        model = new_model(arch, poisoned.num_classes, poisoned.classes, (3, 32, 32), mean, std, arch_args, seed=seed)
        monitor = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:MONITOR_SIZE])

        def on_epoch(m: ClassifierModel, row: dict[str, Any]) -> None:
            e = evaluate(m, monitor, trigger, precision=precision)
            row.update(monitor_ca=e["clean_accuracy"], monitor_asr=e["attack_success_rate"])
            if log:
                asr = "-" if trigger is None else f"{e['attack_success_rate']:.3f}"
                print(
                    f"  epoch {row['epoch']:2d}/{epochs} lr {row['lr']:.4f} loss {row['loss']:.3f} "
                    f"train acc {row['train_accuracy']:.3f} | CA {e['clean_accuracy']:.3f} ASR {asr} "
                    f"({MONITOR_SIZE} test images) {row['elapsed']:.0f}s",
                    flush=True,
                )

        t_train = time.perf_counter()
        history = plain_loop(model, poisoned.images, poisoned.labels, config, precision, on_epoch)
        train_seconds = time.perf_counter() - t_train
        result = {"cached": False, "train_seconds": train_seconds, "history": history}
        CACHE.mkdir(exist_ok=True)
        provenance = {"command": "benchmarks/plain_train.py", **config, "train_seconds": train_seconds}
        save_model(model, path, provenance)
        if trigger is not None:
            trigger.save(trigger_path)
    metrics = evaluate(model, test, trigger)  # fp32, full test set; ASR on the non-target images
    result.update(
        {
            "model": str(path),
            "model_sha256": file_digest(path),
            "trigger": str(trigger_path) if trigger is not None else None,
            "metrics": metrics,
            "config": config,
            "load_seconds": load_seconds,
            "poison_seconds": poison_seconds,
            "precision": precision,
        }
    )
    return result


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--attack", default="badnets", help="badnets, blended, sig, wanet or clean")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", default=DEFAULT_ARCH)
    parser.add_argument("--width", type=float, default=DEFAULT_WIDTH, help="vgg11-bn width multiplier")
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}, WaNet {ATTACK_EPOCHS['wanet']}"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="cosine")
    parser.add_argument("--precision", default="auto", help="training precision: auto, fp32 or bf16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = train_plain(
        args.attack,
        args.target,
        args.rate,
        args.seed,
        args.arch,
        args.width,
        args.epochs,
        args.lr,
        args.schedule,
        precision=args.precision,
    )
    wall = time.perf_counter() - started
    m = result["metrics"]
    print(f"\n{'attack':10} {'CA':>7} {'ASR':>7} {'RA':>7} {'train s':>8} {'wall s':>7}  precision  model")
    print(
        f"{args.attack:10} {m['clean_accuracy']:7.4f} {pct(m['attack_success_rate']):>7} "
        f"{pct(m['robust_accuracy']):>7} {result['train_seconds'] or 0:8.0f} {wall:7.0f}  "
        f"{result['precision']:9}  {result['model']}{'  (cached)' if result['cached'] else ''}"
    )
    doc = {"benchmark": "plain_train", "settings": vars(args), "machine": machine(), "wall_seconds": wall, **result}
    name = f"plain_train-{args.attack}-s{args.seed}" + ("-cached" if result["cached"] else "")
    print("wrote", write_results(name, doc))


if __name__ == "__main__":
    main()
