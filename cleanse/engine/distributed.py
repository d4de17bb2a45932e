"""Data parallelism under torchrun, the standard launcher: `torchrun --nproc-per-node N -m cleanse train ...`.

torchrun starts N copies of the command and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); `join` turns that into a process group (nccl on CUDA, gloo on the CPU) and the rank's
device (cuda:LOCAL_RANK). Every rank walks the same seeded batch order and takes every world-th row of each batch
(`shard`), so the global batch and its augmentation are exactly those of one process; gradients are summed over
ranks in flat buckets, each rank's weighted by its share of the batch (`GradientSync`), so every rank steps the same
weights. Every scalar that drives a decision rides in the same reduction, so ranks never disagree about it. Only
rank 0 reports and writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from cleanse.errors import CleanseError

T = TypeVar("T")
BUCKET_ELEMENTS = 16 * 2**20  # 64 MiB of float32 per all-reduce


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The rank that reports, evaluates for the table and writes files."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return SINGLE


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: cuda:LOCAL_RANK for a CUDA device without
    an index, `device` otherwise. A no-op outside torchrun."""
    if not launched():
        return device
    if device.type == "cuda" and device.index in (None, 0):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "mps":
        raise CleanseError("torchrun on MPS: torch.distributed has no MPS backend; use --device cpu or one process")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def leave() -> None:
    """Leave the process group after every rank has finished (rank 0 may still be writing)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_batch(batch: int, ranks: Ranks, flag: str = "--batch-size") -> None:
    if ranks.parallel and batch % ranks.world:
        raise CleanseError(
            f"{flag} {batch} does not split evenly over {ranks.world} ranks; use a multiple of {ranks.world}"
        )


def shard(rows: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's rows of a global batch: every world-th, starting at the rank."""
    return rows[ranks.rank :: ranks.world] if ranks.parallel else rows


class GradientSync:
    """Sum each parameter's gradient over the ranks, weighting each rank's by its share of the global batch (its
    gradient is of its own mean loss), in flat buckets. Scalars passed to `reduce` ride in the first bucket and come
    back summed, so a loss guard sees the global loss on every rank."""

    def __init__(self, params: Iterable[torch.nn.Parameter], ranks: Ranks) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.ranks = ranks

    def reduce(self, share: float, scalars: list[torch.Tensor]) -> list[torch.Tensor]:
        """After backward: gradients <- sum over ranks of share_r * grad_r; returns the summed `share * scalar`s."""
        if not self.ranks.parallel:
            return scalars
        device = self.params[0].device if self.params else scalars[0].device
        for p in self.params:
            if p.grad is None:  # unused on this rank: the buckets must have the same layout on every rank
                p.grad = torch.zeros_like(p)
        extra = torch.stack([s.detach().float() for s in scalars]).to(device) if scalars else None
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in self.params:
            if size and size + p.numel() > BUCKET_ELEMENTS:
                buckets.append([])
                size = 0
            buckets[-1].append(p.grad)  # type: ignore[arg-type]
            size += p.numel()
        summed: list[torch.Tensor] = []
        for i, grads in enumerate(buckets):
            parts = [g.reshape(-1).float() for g in grads]
            if i == 0 and extra is not None:
                parts.append(extra)
            flat = torch.cat(parts).mul_(share)
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            if i == 0 and extra is not None:
                summed = list(flat[offset:].unbind())
        return summed


def all_sum(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`values` summed over the ranks (a copy; unchanged outside torchrun)."""
    if not ranks.parallel:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out


def class_block(count: int, ranks: Ranks) -> range:
    """This rank's contiguous block of `count` classes: blocks in rank order, the first `count % world` one longer."""
    size, longer = divmod(count, ranks.world)
    start = ranks.rank * size + min(ranks.rank, longer)
    return range(start, start + size + (ranks.rank < longer))


def gather_rows(rows: torch.Tensor, count: int, ranks: Ranks) -> torch.Tensor:
    """Every rank's `rows` (one per class of its class_block(count)) stacked in class order: the (count, ...) tensor,
    on every rank (`rows` itself outside torchrun). The rows travel on their device, which nccl needs to be the rank's
    GPU; bool rows travel as uint8."""
    if not ranks.parallel:
        return rows
    if len(rows) != len(class_block(count, ranks)):
        raise ValueError(f"rank {ranks.rank} holds {len(rows)} rows, not its block of {count}")
    wire = rows.to(torch.uint8) if rows.dtype == torch.bool else rows
    padded = wire.new_zeros((len(class_block(count, Ranks(0, ranks.world))), *rows.shape[1:]))  # block 0 is longest
    padded[: len(rows)] = wire
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    whole = torch.cat([part[: len(class_block(count, Ranks(r, ranks.world)))] for r, part in enumerate(parts)])
    return whole.to(rows.dtype)


def average_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks: where BatchNorm is not
    synchronised (gloo on the CPU), each rank's running statistics saw only its own rows."""
    if not ranks.parallel:
        return
    for buffer in module.buffers():
        if buffer.dtype.is_floating_point:
            dist.all_reduce(buffer)
            buffer.div_(ranks.world)


def sync_batchnorm(net: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """BatchNorm normalising over the global batch (SyncBatchNorm) where torch supports it (CUDA); on the CPU the
    network is returned as it is and average_buffers keeps the running statistics in step."""
    if ranks.parallel and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def from_rank_0(value: T, ranks: Ranks) -> T:
    """Rank 0's `value` on every rank (figures that drive a decision: rank 0 measures, every rank decides alike)."""
    if not ranks.parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank_0(value: T, ranks: Ranks) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere). Tensors should be on the CPU: they travel
    pickled between this job's own processes."""
    if not ranks.parallel:
        return [value]
    out: list[T] | None = [value] * ranks.world if ranks.main else None
    dist.gather_object(value, out, dst=0)
    return out


def turns(count: int, ranks: Ranks) -> list[int]:
    """The items of `count` (in order) that this rank takes when each rank takes whole items: every world-th."""
    return list(range(ranks.rank, count, ranks.world))
