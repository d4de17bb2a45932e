"""Started by tests/test_distributed.py under torchrun (gloo, 2 ranks): the pieces of a scan split over the ranks give
what one process gives. Exits non-zero on the first difference."""

from __future__ import annotations

import torch
from torch import nn

from cleanse.engine.distributed import SINGLE, class_block, current, gather_rows, join, leave
from cleanse.scan.reverse import Budget, Reversed, reverse_triggers

CLASSES = 5  # over 2 ranks: blocks of 3 and 2


class Tiny(nn.Module):
    """5 classes on 6x6 images; class 2 answers to a bright top-left pixel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.conv(x)).flatten(1))
        return out + nn.functional.one_hot(torch.tensor(2), CLASSES) * 20 * x[:, :, 0, 0].mean(1, keepdim=True)


def check_gather_rows() -> None:
    ranks = current()
    block = class_block(CLASSES, ranks)
    values = torch.arange(CLASSES * 2, dtype=torch.float32).view(CLASSES, 2)
    assert torch.equal(gather_rows(values[block.start : block.stop], CLASSES, ranks), values)
    flags = torch.arange(CLASSES) % 2 == 0
    gathered = gather_rows(flags[block.start : block.stop], CLASSES, ranks)
    assert gathered.dtype == torch.bool and torch.equal(gathered, flags)
    counts = torch.arange(CLASSES) * 7
    assert torch.equal(gather_rows(counts[block.start : block.stop], CLASSES, ranks), counts)


def check_reversal() -> None:
    """The screened schedule with early stopping: the screen's choice is global and every rank steps as long as one
    process would, so each class ends where it ends in one process."""
    gen = torch.Generator().manual_seed(0)
    images, labels = (torch.rand(100, 6, 6, 3, generator=gen) * 100).to(torch.uint8), torch.arange(100) % CLASSES
    budget = Budget(steps=40, batch=8, round_steps=5, patience=1, early_stop=2).screened()
    model = Tiny().eval()
    alone = reverse_triggers(model, images, labels, range(CLASSES), budget, seed=3)
    split = reverse_triggers(model, images, labels, range(CLASSES), budget, seed=3, ranks=current())
    assert alone.screened_out is not None and bool(alone.screened_out.any()), "the screen must stop a class"
    assert split.classes == alone.classes == list(range(CLASSES))
    same(split, alone)


def same(a: Reversed, b: Reversed) -> None:
    for name in ("steps_run", "reached", "screened_out"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (name, getattr(a, name), getattr(b, name))
    for name in ("size", "success", "cost", "screen_size"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-5), name
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in b.tensors.items():
        assert torch.allclose(a.tensors[name], t, rtol=0, atol=1e-5), name
    assert len(a.history) == len(b.history)
    for x, y in zip(a.history, b.history, strict=True):
        assert x["active"] == y["active"] and x["screened_out"] == y["screened_out"]
        assert torch.allclose(torch.tensor(x["best_size"]), torch.tensor(y["best_size"]), rtol=1e-5)


def main() -> None:
    join(torch.device("cpu"))
    assert current().world == 2 and current() != SINGLE
    check_gather_rows()
    check_reversal()
    leave()


if __name__ == "__main__":
    main()
