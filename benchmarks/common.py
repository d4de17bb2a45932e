"""Shared helpers for the benchmark scripts: machine description, CIFAR-10 paths, cached models."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
CIFAR = Path(os.environ.get("CLEANSE_CIFAR10", ROOT.parent.parent / "shared" / "datasets" / "cifar10"))
CACHE = ROOT / "cache"
# Trained models kept in git (about 7.9 MB each, safetensors): benchmarks/cache/ does not survive from one
# work session to the next, and retraining a CIFAR-10 model is slow (times: benchmarks/models/README.md).
KEPT_MODELS = ROOT / "models"
RESULTS = ROOT / "results"

# The target class each attack poisons in every benchmark: four attacks, four targets (so a scan that names
# the right class is not naming the same class every time). SIG is clean-label, so 10% poisoning takes all of
# class 3's training images.
DEFAULT_TARGETS = {"badnets": 0, "blended": 1, "sig": 3, "wanet": 5, "clean": 0}
SEEDS = (0, 1, 2)
DEFAULT_MODELS = tuple(f"{a}:{DEFAULT_TARGETS[a]}:{s}" for a in ("badnets", "blended", "sig", "wanet") for s in SEEDS)
CLEAN_MODELS = tuple(f"clean:0:{s}" for s in SEEDS)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


def require_cifar() -> Path:
    if not (CIFAR / "train").is_dir():
        sys.exit(f"CIFAR-10 ImageFolder not found at {CIFAR}; set CLEANSE_CIFAR10 to its folder")
    return CIFAR


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256: which weights a stored row measured (a model retrained
    with the same configuration on another machine has the same cache name but other weights)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_results(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def parse_models(spec: str) -> list[tuple[str, int, int]]:
    """'badnets:0:0,blended:1:0' -> [(attack, target, seed), ...]; 'badnets:0' or 'badnets' fill in the defaults
    (seed 0)."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        attack = parts[0]
        if attack not in DEFAULT_TARGETS:
            sys.exit(f"--models {item!r}: unknown attack {attack!r}; use one of {', '.join(DEFAULT_TARGETS)}")
        target = int(parts[1]) if len(parts) > 1 else DEFAULT_TARGETS[attack]
        seed = int(parts[2]) if len(parts) > 2 else 0
        out.append((attack, target, seed))
    return out


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a benchmark's JSONL store, the latest per `key` (a rerun with --redo replaces the earlier row)."""
    if not path.is_file():
        return []
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["key"]] = row
    return list(rows.values())


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Store one finished row at once, so an interrupted campaign keeps what it measured."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def poison_for(train: Any, attack: str, target: int | str, rate: float, seed: int) -> tuple[Any, Any, float]:
    """The training set a benchmark model learns from (`attack` "clean": the set itself), its trigger (None for
    clean) and the seconds poisoning took."""
    from cleanse.attacks import poison_dataset

    started = time.perf_counter()
    if attack == "clean":
        return train, None, 0.0
    poisoned, trigger = poison_dataset(train, attack, target, rate, seed=seed)
    return poisoned, trigger, time.perf_counter() - started
