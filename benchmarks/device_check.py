"""Device check: the demo's pipeline at small sizes on an accelerator and on the CPU, side by side.

    python -m benchmarks.device_check --device cuda      # or cuda:N, mps
    python -m benchmarks.device_check --device cpu       # self-check: both columns on the CPU
        [--epochs 6] [--skip scan,audit] [--detectors patch]

Everything runs through the Python jobs API (cleanse.jobs) on the built-in synthetic set (no downloads), in a
temporary folder. `poison` runs once (BadNets, target 0, 10%; device-independent); then each step runs on the CPU
and on the device and is timed on both (the clock stops after synchronising the device):

- train: `train` of the demo's quick `cnn` (width 32,64,64), `--epochs` epochs, auto precision. Compared: final
  CA and ASR, each within 0.05 (absolute).
- tar: Grad-CAM TAR (`measure_tar` at the TAR layer) of the CPU-trained model on 256 test images with the
  trigger; seconds are the mean of 3 calls after a warm-up call. Compared: TAR, within 5% of the CPU's (relative).
- scan: `scan --budget fast` of the CPU-trained model on synthetic:test, every detector (or `--detectors`).
  Compared: the suspected targets, equal.
- audit: `scan --audit-data` of the poisoned training set with the CPU-trained model (split test + spectral
  signature). Compared: the flagged classes, equal; the flagged-row count, within 10% of the CPU's.
- unlearn: `unlearn --method tar-ewc --clean-frac 0.05` of the CPU-trained model with the true trigger.
  Compared: after-CA and after-ASR, each within 0.05 (absolute).

The tolerances are loose on purpose: a GPU trains in another precision (bf16 or fp16 where the CPU may use fp32),
with TF32 and other kernels, so trajectories differ; a wrong result (a device bug) moves these figures far more. The
later steps share the CPU-trained model, so they compare the device's arithmetic, not two trainings.

Prints a markdown table (figure on the CPU, figure on the device, agree, seconds on each, speed-up = CPU seconds /
device seconds) and writes results/device_check-<device type>.json. Exit status: 0 when every row agrees, 1 when a
figure disagrees or a step fails on one side (each named below the table), 2 when the device is absent or an option
is wrong (one line on stderr). Device times include cuDNN autotuning (as a real run does); the device is touched
once before the first step so CUDA's context start is not charged to `train`. `--device cpu` runs both columns on
the CPU: a self-check of the script (speed-ups near 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, write_results
from cleanse.attacks import load_trigger
from cleanse.data import load_data
from cleanse.engine.device import resolve_device
from cleanse.engine.layers import tar_layer
from cleanse.engine.tar import measure_tar
from cleanse.errors import CleanseError
from cleanse.jobs import (
    PoisonOptions,
    RunSettings,
    ScanOptions,
    TrainOptions,
    UnlearnOptions,
    poison,
    scan,
    train,
    unlearn,
)
from cleanse.models import ModelOptions, load_model
from cleanse.scan.detectors import DETECTORS

STEPS = ("train", "tar", "scan", "audit", "unlearn")
WIDTH = "32,64,64"  # the demo's --quick cnn
TAR_IMAGES = 256
TAR_REPS = 3
TOLERANCES = {
    "train": "final CA and ASR each within 0.05 (absolute)",
    "tar": "TAR within 5% of the CPU's (relative)",
    "scan": "suspected targets equal",
    "audit": "flagged classes equal, flagged-row count within 10% of the CPU's",
    "unlearn": "after-CA and after-ASR each within 0.05 (absolute)",
}
ABS_RATE = 0.05
REL_TAR = 0.05
REL_ROWS = 0.10


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return "CPU"


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - started, out


class Pipeline:
    """The shared inputs (poisoned set, trigger, CPU-trained model) and one method per step and side."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        self.folder = folder
        self.args = args
        self.poisoned = folder / "poisoned.safetensors"
        self.trigger = folder / "poisoned.trigger.safetensors"
        self.model = folder / "model-cpu.safetensors"  # what tar, scan, audit and unlearn measure on both sides

    def poison(self) -> float:
        seconds, _ = timed(
            lambda: poison(PoisonOptions("synthetic", self.poisoned, attack="badnets", target=0, rate=0.1)),
            torch.device("cpu"),
        )
        return seconds

    def train(self, device: torch.device, tag: str) -> dict[str, Any]:
        result = train(
            TrainOptions(
                data=str(self.poisoned),
                output=self.folder / f"model-{tag}.safetensors",
                model=ModelOptions(arch="cnn", arch_args={"width": WIDTH}),
                epochs=self.args.epochs,
                test="synthetic:test",
                trigger=self.trigger,
            ),
            RunSettings(device=str(device)),
        )
        m = result.metrics
        return {"ca": m["clean_accuracy"], "asr": m["attack_success_rate"], "precision": result.precision}

    def tar(self, device: torch.device, tag: str) -> tuple[float, dict[str, Any]]:
        """(mean seconds of one measure_tar call after a warm-up call, figures)."""
        model = load_model(self.model, None, device)
        layer = tar_layer(model, model.spec.input_size)
        test = load_data("synthetic:test")
        images, labels = test.images[:TAR_IMAGES], test.labels[:TAR_IMAGES]
        trigger = load_trigger(self.trigger)

        def once() -> dict[str, Any]:
            return measure_tar(model, images, labels, trigger, layer)

        once()  # warm-up: cuDNN autotuning and allocator growth, not TAR's steady cost
        seconds, result = timed(lambda: [once() for _ in range(TAR_REPS)][-1], device)
        return seconds / TAR_REPS, {"tar": result["tar"], "clean_tar": result["clean_tar"], "n": result["n"]}

    def scan(self, device: torch.device, tag: str) -> dict[str, Any]:
        detectors = self.args.detectors.split(",") if self.args.detectors else None
        result = scan(
            ScanOptions(
                str(self.model),
                data="synthetic:test",
                budget="fast",
                detectors=detectors,
                output=self.folder / f"scan-{tag}",
            ),
            RunSettings(device=str(device)),
        )
        return {"suspected_targets": list(result.doc["suspected_targets"]), "backdoored": result.backdoored}

    def audit(self, device: torch.device, tag: str) -> dict[str, Any]:
        result = scan(
            ScanOptions(str(self.model), audit_data=str(self.poisoned), output=self.folder / f"audit-{tag}"),
            RunSettings(device=str(device)),
        )
        audit = result.doc["audit"]
        return {"flagged_classes": list(audit["flagged_classes"]), "flagged_rows": audit["flagged_rows"]}

    def unlearn(self, device: torch.device, tag: str) -> dict[str, Any]:
        result = unlearn(
            UnlearnOptions(
                str(self.model),
                str(self.poisoned),
                method="tar-ewc",
                clean_frac=0.05,
                trigger=self.trigger,
                test="synthetic:test",
                output=self.folder / f"clean-{tag}.safetensors",
            ),
            RunSettings(device=str(device)),
        )
        after = result.summaries["tar-ewc"]["after"]
        return {"ca": after["clean_accuracy"], "asr": after["attack_success_rate"]}


def run_side(pipe: Pipeline, step: str, device: torch.device, tag: str) -> dict[str, Any]:
    """One step on one side: {seconds, figures, error}; an exception (the device bug this check looks for) is kept
    as its one-line message, and the traceback goes to stderr."""
    try:
        if step == "tar":
            seconds, figures = pipe.tar(device, tag)
        else:
            seconds, figures = timed(lambda: getattr(pipe, step)(device, tag), device)
        return {"seconds": seconds, "figures": figures, "error": None}
    except Exception as exc:  # a failing step is a finding, reported in the table
        traceback.print_exc(file=sys.stderr)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"seconds": None, "figures": None, "error": f"{type(exc).__name__}: {message}"}


def _close(a: float | None, b: float | None, tol: float, relative: bool = False) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= (tol * abs(a) if relative else tol)


def compare(step: str, cpu: dict[str, Any], dev: dict[str, Any]) -> tuple[bool, str | None]:
    """(agree, why not) for two sides' figures."""
    if step in ("train", "unlearn"):
        bad = [k for k in ("ca", "asr") if not _close(cpu[k], dev[k], ABS_RATE)]
        why = ", ".join(f"{k.upper()} {cpu[k]:.3f} vs {dev[k]:.3f}" for k in bad)
        return not bad, (f"{why} (tolerance {ABS_RATE} absolute)" if bad else None)
    if step == "tar":
        ok = _close(cpu["tar"], dev["tar"], REL_TAR, relative=True)
        return ok, None if ok else f"TAR {cpu['tar']} vs {dev['tar']} (tolerance {REL_TAR:.0%} relative)"
    if step == "scan":
        ok = cpu["suspected_targets"] == dev["suspected_targets"]
        return ok, None if ok else f"suspected targets {cpu['suspected_targets']} vs {dev['suspected_targets']}"
    ok_classes = cpu["flagged_classes"] == dev["flagged_classes"]
    ok_rows = abs(cpu["flagged_rows"] - dev["flagged_rows"]) <= REL_ROWS * cpu["flagged_rows"]
    if ok_classes and ok_rows:
        return True, None
    return False, (
        f"flagged classes {cpu['flagged_classes']} vs {dev['flagged_classes']}, rows {cpu['flagged_rows']} vs "
        f"{dev['flagged_rows']} (rows within {REL_ROWS:.0%})"
    )


def show(step: str, figures: dict[str, Any] | None, error: str | None) -> str:
    if error is not None:
        return "FAILED"
    assert figures is not None
    if step == "train":
        return f"CA {figures['ca']:.3f}, ASR {figures['asr']:.3f} ({figures['precision']})"
    if step == "unlearn":
        return f"CA {figures['ca']:.3f}, ASR {figures['asr']:.3f}"
    if step == "tar":
        tar = "none" if figures["tar"] is None else f"{figures['tar']:.4f}"
        return f"TAR {tar} (n {figures['n']})"
    if step == "scan":
        return f"targets {figures['suspected_targets']}"
    return f"classes {figures['flagged_classes']}, {figures['flagged_rows']} rows"


def row_for(step: str, cpu: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    agree: bool
    why: str | None
    if cpu["error"] or dev["error"]:
        agree = False
        why = "; ".join(f"{side} failed: {s['error']}" for side, s in (("CPU", cpu), ("device", dev)) if s["error"])
    else:
        agree, why = compare(step, cpu["figures"], dev["figures"])
    speedup = cpu["seconds"] / dev["seconds"] if cpu["seconds"] and dev["seconds"] else None
    return {
        "step": step,
        "cpu": cpu["figures"],
        "device": dev["figures"],
        "agree": agree,
        "why": why,
        "cpu_seconds": cpu["seconds"],
        "device_seconds": dev["seconds"],
        "speedup": speedup,
        "cpu_error": cpu["error"],
        "device_error": dev["error"],
        "tolerance": TOLERANCES[step],
    }


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.3f}" if s < 1 else f"{s:.1f}"


def table(rows: list[dict[str, Any]], label: str) -> str:
    lines = [
        f"| step | CPU | {label} | agree | CPU s | {label} s | speed-up |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        cpu = show(r["step"], r["cpu"], r["cpu_error"])
        dev = show(r["step"], r["device"], r["device_error"])
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['step']} | {cpu} | {dev} | {'yes' if r['agree'] else 'NO'} | {_seconds(r['cpu_seconds'])} | "
            f"{_seconds(r['device_seconds'])} | {speedup} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, help="cuda, cuda:N, mps (or cpu: a self-check, both sides CPU)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6, the demo's quick run)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    parser.add_argument("--detectors", default=None, help="scan's detectors (default: every one)")
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    """The device and the steps to run; a CleanseError (exit 2) for a missing device or a wrong option."""
    device = resolve_device(args.device)
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    unknown = [s for s in skip if s not in STEPS]
    if unknown:
        raise CleanseError(f"--skip {','.join(unknown)}: not a step; the steps are {', '.join(STEPS)}")
    if args.epochs < 1:
        raise CleanseError(f"--epochs {args.epochs} must be at least 1")
    for name in args.detectors.split(",") if args.detectors else []:
        DETECTORS.get(name)  # an unknown name: a CleanseError listing the known ones
    return device, [s for s in STEPS if s not in skip]


def main() -> None:
    args = parse_args()
    try:
        device, steps = check_args(args)
    except CleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    cpu = torch.device("cpu")
    label = str(device) if device.type != "cpu" else "cpu (self-check)"
    print(
        f"device check: {device} ({device_name(device)}) against the CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {args.epochs} epochs",
        flush=True,
    )
    if device.type != "cpu":  # start the device's context before the first timed step
        torch.ones(1, device=device).add_(1)
        synchronize(device)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline(Path(tmp), args)
        poison_seconds = pipe.poison()
        for spec in (str(pipe.poisoned), "synthetic:test"):  # read once untimed: the CPU side runs first
            load_data(spec)
        # the CPU model is every later step's input: trained even when the train row is skipped
        cpu_train = run_side(pipe, "train", cpu, "cpu")
        if cpu_train["error"]:
            print(f"error: training on the CPU failed ({cpu_train['error']}); nothing to compare", file=sys.stderr)
            sys.exit(1)
        for step in steps:
            print(f"{step} ...", flush=True)
            cpu_side = cpu_train if step == "train" else run_side(pipe, step, cpu, "cpu")
            dev_side = run_side(pipe, step, device, "device")
            rows.append(row_for(step, cpu_side, dev_side))
    wall = time.perf_counter() - started
    print()
    print(table(rows, label))
    agree = all(r["agree"] for r in rows)
    for r in rows:
        if not r["agree"]:
            print(f"disagrees: {r['step']}: {r['why']}")
    print(
        f"\n{'every row agrees' if agree else 'NOT every row agrees'}; wall {wall:.1f}s (poison {poison_seconds:.1f}s)"
    )
    doc = {
        "benchmark": "device_check",
        "settings": {
            "device": args.device,
            "epochs": args.epochs,
            "steps": steps,
            "detectors": args.detectors,
            "arch": f"cnn width {WIDTH}",
            "data": "synthetic (poison badnets, target 0, rate 0.1), test synthetic:test",
            "tar_images": TAR_IMAGES,
        },
        "machine": machine(),
        "device": {"resolved": str(device), "name": device_name(device)},
        "tolerances": TOLERANCES,
        "rows": rows,
        "agree": agree,
        "poison_seconds": poison_seconds,
        "wall_seconds": wall,
    }
    print("wrote", write_results(f"device_check-{device.type}", doc))
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
