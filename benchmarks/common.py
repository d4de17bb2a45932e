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
RESULTS = ROOT / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def require_cifar() -> Path:
    if not (CIFAR / "train").is_dir():
        sys.exit(f"CIFAR-10 ImageFolder not found at {CIFAR}; set CLEANSE_CIFAR10 to its folder")
    return CIFAR


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def write_results(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
