"""Train the default `cnn` on real CIFAR-10 with BadNets 10% poisoning and time it.

Target (issue 2): at least 88% clean accuracy and 95% ASR in at most 20 minutes of
wall time on 2 CPU cores, with `cleanse train`'s default settings.

    python benchmarks/train_cifar10.py [--attack badnets] [--seed 0] [--epochs N]

Prints a table and writes benchmarks/results/train_cifar10-<attack>[-r<rate>]-s<seed>.json (the rate
only when it is not 10%). The
trained model is cached under benchmarks/cache/ by configuration hash for the
other benchmarks (delete it to retrain); a model of the same name in benchmarks/models/
(kept in git) is used when the cache has none.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import (
    CACHE,
    KEPT_MODELS,
    config_hash,
    file_digest,
    machine,
    poison_for,
    require_cifar,
    write_results,
)
from cleanse.data import load_data
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import evaluate
from cleanse.engine.train import TrainConfig, train_model
from cleanse.models import load_model, new_model, save_model
from cleanse.training_defaults import data_normalization

LATER_FIELDS = ("optimizer",)


def model_key(
    attack: str,
    target: int | str,
    rate: float,
    seed: int,
    epochs: int | None = None,
    arch: str = "cnn",
    arch_args: dict | None = None,
) -> tuple[TrainConfig, dict, Path]:
    """The training configuration, its cache key and the model file `train_cached` uses: the cache's copy, else
    the kept one in benchmarks/models/, else the cache path a training run would write."""
    config = TrainConfig(seed=seed) if epochs is None else TrainConfig(seed=seed, epochs=epochs)
    # fields added to TrainConfig later are left out at their default, so earlier models keep their cache names
    settings = {k: v for k, v in config.__dict__.items() if not (k in LATER_FIELDS and v is None)}
    key = {"attack": attack, "target": target, "rate": rate, "seed": seed, "arch": arch, "config": settings}
    if arch_args:  # only when given, so the cache names of every earlier model stay the same
        key["arch_args"] = arch_args
    name = f"{arch}-{attack}-t{target}-s{seed}-{config_hash(key)}.safetensors"
    path = CACHE / name
    if not path.is_file() and (KEPT_MODELS / name).is_file():
        path = KEPT_MODELS / name
    return config, key, path


def train_cached(
    attack: str,
    target: int | str,
    rate: float,
    seed: int,
    epochs: int | None = None,
    arch: str = "cnn",
    log: bool = True,
    arch_args: dict | None = None,
) -> dict:
    """Poison, train and evaluate (or reuse the cached model). Returns the model path, metrics and timings."""
    cifar = require_cifar()
    t0 = time.perf_counter()
    train = load_data(str(cifar / "train"))
    test = load_data(str(cifar / "test"))
    load_seconds = time.perf_counter() - t0
    config, key, path = model_key(attack, target, rate, seed, epochs, arch, arch_args)
    trigger_path = path.with_suffix(".trigger.safetensors")
    poisoned, trigger, poison_seconds = poison_for(train, attack, target, rate, seed)
    device = torch.device("cpu")
    config.precision = resolve_precision("auto", device)
    if path.is_file():
        model = load_model(path)
        result = {"cached": True, "train_seconds": model.spec.provenance.get("train_seconds")}
    else:
        mean, std = data_normalization(poisoned)
        model = new_model(
            arch, poisoned.num_classes, poisoned.classes, (3, 32, 32), mean, std, arch_args=arch_args, seed=seed
        )
        cb = (
            (
                lambda e: (
                    print(
                        f"  epoch {e.data['epoch']:2d} loss {e.data['loss']:.3f} "
                        f"CA {e.data.get('clean_accuracy') or 0:.4f} "
                        f"ASR {e.data.get('attack_success_rate') or 0:.4f} {e.data['elapsed']:.0f}s",
                        flush=True,
                    )
                    if e.kind == "row"
                    else None
                )
            )
            if log
            else (lambda e: None)
        )
        out = train_model(model, poisoned, config, test=test, trigger=trigger, callback=cb)
        result = {"cached": False, "train_seconds": out["train_seconds"], "history": out["history"]}
        CACHE.mkdir(exist_ok=True)
        save_model(
            model, path, {"command": "benchmarks/train_cifar10.py", **key, "train_seconds": out["train_seconds"]}
        )
        if trigger is not None:
            trigger.save(trigger_path)
    metrics = evaluate(model, test, trigger)  # fp32, as every command reports
    result.update(
        {
            "model": str(path),
            "model_sha256": file_digest(path),
            "trigger": str(trigger_path) if trigger else None,
            "metrics": metrics,
            "load_seconds": load_seconds,
            "poison_seconds": poison_seconds,
            "precision": config.precision,
        }
    )
    return result


def _target(text: str) -> int | str:
    return text if text == "all" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--target", type=_target, default=0, help="a class index, or 'all' (all-to-all, y -> y+1)")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: cleanse train's default")
    args = parser.parse_args()
    started = time.perf_counter()
    result = train_cached(args.attack, args.target, args.rate, args.seed, args.epochs)
    wall = time.perf_counter() - started
    m = result["metrics"]
    print(f"\n{'attack':10} {'CA':>7} {'ASR':>7} {'RA':>7} {'train s':>8} {'wall s':>7}  precision")
    print(
        f"{args.attack:10} {m['clean_accuracy']:7.4f} {(m['attack_success_rate'] or 0):7.4f} "
        f"{(m['robust_accuracy'] or 0):7.4f} "
        f"{result['train_seconds'] or 0:8.0f} {wall:7.0f}  "
        f"{result['precision']}{'  (cached model)' if result['cached'] else ''}"
    )
    doc = {"benchmark": "train_cifar10", "settings": vars(args), "machine": machine(), "wall_seconds": wall, **result}
    kind = f"{args.attack}-all" if args.target == "all" else args.attack
    rate = "" if args.rate == 0.1 or args.attack == "clean" else f"-r{args.rate:g}"  # 10% keeps its old name
    name = f"train_cifar10-{kind}{rate}-s{args.seed}" + ("-cached" if result["cached"] else "")
    print("wrote", write_results(name, doc))


if __name__ == "__main__":
    main()
