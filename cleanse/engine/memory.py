"""Memory budgets: how many bytes one optimisation step may take, what one image costs in it, and how many
independent units (classes) fit; out-of-memory recognised on every device.

A step that optimises K independent units (the scan's classes) with n images each holds, until its backward,
what autograd saved for those K x n images. The cost of one image is measured, not guessed: the tensors autograd
saves during a forward of 1 and of 2 images are summed (`torch.autograd.graph.saved_tensors_hooks`; each storage
counted once, the model's parameters and buffers never) and the difference is the saved bytes of one image, on
the device and at the precision the work runs at. IMAGE_COPIES float copies of the image are added for what the
hooks do not see: the input, the stamped copy the model reads, its channels-last copy and its gradient. Then

    units per chunk = max(1, min(K, budget // (bytes per image x images per unit)))

An estimate of the dominant term, not a bound: the backward's transient gradients and the allocator's slack come on
top, which is why the default budget is only a fraction of the free memory.

On a CPU the chunk is also cut for speed: a forward of hundreds of images streams every layer's activation maps
through main memory, while one of a few dozen keeps them in the caches. So a CPU forward holds at most
CPU_FORWARD_BYTES of saved tensors (still at least one unit), whatever the budget: 1.3-1.8x faster per image-step
on the `cnn` at 32, 64 and 224 pixels (benchmarks/scan_forward_size.py), and a smaller footprint. Devices with their
own memory (CUDA, MPS) run whole budget-sized chunks: their kernels want large batches.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanse.engine.device import autocast
from cleanse.errors import CleanseError

DEFAULT_FRACTION = 0.5  # of the device's free memory, when no --memory-budget is given
FALLBACK_BYTES = 2 * 2**30  # when the free memory cannot be read
CPU_FORWARD_BYTES = 256 * 2**20  # saved tensors one CPU forward holds at most (speed, see above)
IMAGE_COPIES = 4  # float copies of an image per image-step beyond the saved ones: input, stamped, channels-last, grad
UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
MEMINFO = Path("/proc/meminfo")


def parse_memory(text: str | int, flag: str = "--memory-budget") -> int:
    """Bytes from '4GiB', '512MiB', '2GB', '1.5GiB' or a plain number of bytes (units are case-insensitive)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text).strip().lower())
        if match is None or (match.group(2) and match.group(2) not in UNITS):
            raise CleanseError(
                f"{flag} {str(text)!r} is not a memory size; give bytes with an optional unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 4GiB, 512MiB, 2GB or 1000000000"
            )
        value = int(float(match.group(1)) * UNITS[match.group(2) or "b"])
    if value < 1:
        raise CleanseError(f"{flag} {str(text)!r} must be at least 1 byte; e.g. 4GiB or 512MiB")
    return value


def format_bytes(n: float) -> str:
    """'1.5 GiB', '512 MiB', '900 B'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_memory(device: torch.device) -> tuple[int | None, str]:
    """The memory work on `device` may still take, and where that figure comes from; None when unreadable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's own, reusable
        return free + cached, "free CUDA memory (torch.cuda.mem_get_info, plus torch's unused cache)"
    if device.type == "mps":
        mps = getattr(torch, "mps", None)
        if hasattr(mps, "recommended_max_memory") and hasattr(mps, "current_allocated_memory"):
            free = mps.recommended_max_memory() - mps.current_allocated_memory()  # type: ignore[union-attr]
            return max(0, free), "MPS recommended maximum minus allocated"
        return None, "MPS memory (unreadable with this torch)"
    available = _meminfo_available()
    return available, "MemAvailable in /proc/meminfo" if available is not None else "MemAvailable (unreadable)"


def default_budget(device: torch.device) -> tuple[int, str]:
    """DEFAULT_FRACTION of the device's free memory, or FALLBACK_BYTES when that cannot be read; and how it was set."""
    free, source = free_memory(device)
    if free is None:
        return FALLBACK_BYTES, f"fixed {format_bytes(FALLBACK_BYTES)} ({source})"
    return max(1, int(free * DEFAULT_FRACTION)), f"{DEFAULT_FRACTION} x {source} ({format_bytes(free)})"


def saved_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves while `run()` builds its graph; each storage once, `exclude`'s never."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()  # kept alive until counted: its graph holds the saved storages, so no address is reused
    del out
    return total


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters take no gradient inside (autograd then saves nothing for weight gradients)."""
    thawed = [w for w in model.parameters() if w.requires_grad]
    for w in thawed:
        w.requires_grad_(False)
    try:
        yield
    finally:
        for w in thawed:
            w.requires_grad_(True)


def saved_bytes_per_image(
    model: nn.Module, shape: tuple[int, int, int], precision: str = "fp32", training: bool = False
) -> int:
    """What autograd saves per image for a forward of `model`: saved(2 images) - saved(1 image), on the model's device
    and at `precision`. By default as the scan's optimisations run it (frozen, input needing a gradient); `training`:
    as a weight update runs it (the trainable parameters taking gradients, the input not). Both probe in eval mode, so
    no BatchNorm statistic moves (and no SyncBatchNorm collective runs); train mode saves the same activations."""
    device = next(model.parameters()).device
    fixed = [*model.parameters(), *model.buffers()]
    gen = torch.Generator().manual_seed(0)

    def saved(n: int) -> int:
        x = torch.rand((n, *shape), generator=gen).to(device).requires_grad_(not training)

        def run() -> torch.Tensor:
            with autocast(device, precision):
                return model(x.contiguous(memory_format=torch.channels_last))

        return saved_bytes(run, fixed)

    was_training = model.training
    model.eval()
    try:
        with contextlib.nullcontext() if training else frozen(model):
            return max(0, saved(2) - saved(1))
    finally:
        model.train(was_training)


def units_per_chunk(budget: int, bytes_per_image: int, images_per_unit: int, units: int) -> int:
    """How many independent units (classes) of `images_per_unit` images one step may hold within `budget`: at least 1,
    at most `units`."""
    per_unit = max(1, bytes_per_image) * max(1, images_per_unit)
    return max(1, min(units, budget // per_unit))


@dataclass(frozen=True)
class MemoryPlan:
    """The budget one step may take and one image's cost in it: the one place the scan's chunk sizes come from."""

    budget: int  # bytes
    source: str  # "--memory-budget", or how the default was set
    saved_per_image: int  # bytes autograd saves per image (measured)
    image_bytes: int  # one float32 image
    forward_bytes: int | None = None  # on a CPU, the most one forward holds for speed (None: the budget alone)

    @property
    def per_image(self) -> int:
        """Bytes per image-step: the saved tensors plus IMAGE_COPIES float copies of the image."""
        return self.saved_per_image + IMAGE_COPIES * self.image_bytes

    @property
    def forward_budget(self) -> int:
        """The bytes one forward may hold: the budget, or less on a CPU (CPU_FORWARD_BYTES)."""
        return self.budget if self.forward_bytes is None else min(self.budget, self.forward_bytes)

    def chunk(self, images_per_class: int, num_classes: int) -> int:
        return units_per_chunk(self.forward_budget, self.per_image, images_per_class, num_classes)

    def images_per_forward(self, images_per_class: int) -> int:
        """One class's images a forward holds: all of them when a class fits the forward budget, else a slice (at
        least one image), for work that can cut a class's batch (the reversal)."""
        return max(1, min(images_per_class, self.forward_budget // max(1, self.per_image)))

    def rows_per_forward(self, images_per_row: int = 1) -> int:
        """Batch rows one training forward may hold when each row puts `images_per_row` images through the model (a
        clean image and its triggered copy: 2); at least 1. A recipe's batch is stepped in pieces of this many rows."""
        return max(1, self.forward_budget // (max(1, self.per_image) * max(1, images_per_row)))

    def to_json(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "budget": format_bytes(self.budget),
            "budget_source": self.source,
            "saved_bytes_per_image": self.saved_per_image,
            "image_copies": IMAGE_COPIES,
            "bytes_per_image_step": self.per_image,
            "forward_bytes": self.forward_bytes,  # null: forwards as large as the budget allows
        }


def plan_memory(
    model: nn.Module, shape: tuple[int, int, int], precision: str, budget: int | None = None, training: bool = False
) -> MemoryPlan:
    """The plan for work on `model`'s device: `budget` bytes (--memory-budget), or the default share of free memory;
    `training`: for weight updates (unlearn's recipes) rather than the scan's input optimisation."""
    device = next(model.parameters()).device
    source = "--memory-budget"
    if budget is None:
        budget, source = default_budget(device)
    forward = CPU_FORWARD_BYTES if device.type == "cpu" else None
    saved = saved_bytes_per_image(model, shape, precision, training)
    return MemoryPlan(budget, source, saved, 4 * math.prod(shape), forward)


def is_out_of_memory(exc: BaseException) -> bool:
    """Did an allocation fail? torch.OutOfMemoryError (CUDA), MemoryError, or the CPU/MPS allocators' RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text
    return False
