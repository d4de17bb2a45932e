"""Small helpers shared by the hardening modules and tests/test_unlearn_resume.py: tiny inputs, the one-error-line
check, and `python -m cleanse` subprocesses for the signal tests. Fixtures built from these live in
tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from PIL import Image

from cleanse.models import new_model

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
TINY = {"width": "8,16,16"}
# the property-based tests' settings: CLEANSE_HYPOTHESIS_EXAMPLES=5000 hunts longer; the default keeps the files fast
FAST = settings(
    max_examples=int(os.environ.get("CLEANSE_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TRAIN_ARGS = ["--arch-arg", "width=8,16,16", "--batch-size", "50", "--precision", "fp32", "--device", "cpu"]


# --- tiny inputs -----------------------------------------------------------------------------------------------------


def tiny_model(num_classes: int):
    return new_model("cnn", num_classes, None, (3, 32, 32), MEAN, STD, dict(TINY), seed=0).eval()


def write_npz(path: Path, classes: int, per_class: int, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (classes * per_class, size, size, 3), dtype=np.uint8)
    np.savez(path, x=x, y=np.repeat(np.arange(classes), per_class))
    return path


def png(path: Path, size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height pixels (the data does not follow)."""
    raw = bytearray(png(path, (1, 1)).read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def st_bytes(header: Any, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-like file: 8-byte little-endian header length, the header text, then `body`."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


class Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- checks on a CliRunner result ------------------------------------------------------------------------------------


def listing(*folders: Path) -> set[str]:
    return {str(p) for folder in folders for p in folder.rglob("*")}


def error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


# --- real subprocesses -----------------------------------------------------------------------------------------------


def cleanse_process(args: list[Any], cache: Path) -> tuple[subprocess.Popen, list[str]]:
    """Start `python -m cleanse ARGS`; its stderr lines are collected in the returned list as they arrive."""
    import threading

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLEANSE_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cleanse", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # a background shell may ignore SIGINT
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return proc, lines


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, lines: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended early (exit {proc.returncode}): {''.join(lines)}"
        assert time.monotonic() < deadline, f"timed out waiting; stderr so far: {''.join(lines)}"
        time.sleep(0.02)


def finish(proc: subprocess.Popen, lines: list[str]) -> tuple[int, str]:
    code = proc.wait(timeout=60)
    time.sleep(0.1)  # let the reader thread take the last lines
    return code, "".join(lines)


# --- recipes run directly (no CLI) ------------------------------------------------------------------------------------

# Set after validation: a value no user may give, which keeps a phase running its whole budget whatever the model. With
# asr_stop=0.0 tar-ewc's phase 1 still stopped on CI once held-back ASR reached exactly 0.
NEVER_STOP = {"tar-ewc": {"asr_stop": -1.0}}


def run_recipe(
    name: str, params: dict[str, Any], model: Any, trigger: Any, n: int = 200, **context: Any
) -> tuple[Any, Any]:
    """Run recipe `name` on a copy of `model` with an n-image clean subset of the synthetic set (seed 4), fp32, seed
    7; `context`: further RecipeContext fields (checkpoints, memory). Returns (the model, the RecipeResult)."""
    import copy

    from cleanse.data import make_synthetic
    from cleanse.data.subset import clean_subset
    from cleanse.engine.layers import tar_layer
    from cleanse.recipes import RECIPES, RecipeContext

    net = copy.deepcopy(model)
    recipe = RECIPES.get(name)
    resolved = {**recipe.resolve_params(params), **NEVER_STOP.get(name, {})}
    ctx = RecipeContext(
        net,
        clean_subset(make_synthetic("train"), n=n, seed=4),
        trigger,
        resolved,
        callback=lambda e: None,
        precision="fp32",
        seed=7,
        tar_layer=tar_layer(net, net.spec.input_size),
        **context,
    )
    return net, recipe.run(ctx)
