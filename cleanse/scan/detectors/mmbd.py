"""MM-BD, maximum-margin backdoor detection (Wang et al., "MM-BD: Post-Training Detection of Backdoor Attacks
with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024). Needs no data.

For each class t, start `images` inputs uniformly at random in [0,1] and climb the margin
logit_t(x) - max_{j != t} logit_j(x) by gradient steps on the clipped inputs; the class's statistic r_t is the
largest margin reached. A backdoor target's margin is abnormally large: the trigger is a shortcut the network
learned to answer with confidence. The null is a gamma distribution fitted to the other classes' statistics and
the order-statistic p-value of r_t among K classes is 1 - F(r_t)^K; p < alpha flags t.

Defaults follow the official code (github.com/wanghangpsu/MM-BD, univ_bd.py): 30 images per class, 300 steps of
size 1e-2 on the summed margins, stop when the loss changes by less than 1e-5 relative, alpha 0.05. The
published script rebuilds its SGD optimiser (momentum 0.2) every step, so the momentum never acts: plain
gradient steps are the same algorithm. It fits the null only for the class with the largest statistic; we
compute every class's p-value the same way (the largest class's is the published one). Our departure: the gamma
is fitted by maximum likelihood with its location fixed at 0 (scipy's three-parameter fit on nine points is
ill-posed; margins are positive), shifted below the smallest statistic when one is not.

Under torchrun each rank climbs a contiguous block of the classes; it first draws and drops the random starts of the
classes before its block, so its classes start from the images they start from in one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from cleanse.engine.device import autocast
from cleanse.engine.distributed import class_block, gather_rows
from cleanse.engine.events import Callback, Event
from cleanse.engine.memory import frozen
from cleanse.scan.detectors.base import DETECTORS, Detector, DetectorReport, ScanInputs

IMAGES = 30  # random starts per class (NI... the published `images = torch.rand([30, ...])`)
STEPS = 300  # NSTEP
STEP_SIZE = 1e-2
TOLERANCE = 1e-5  # relative change of the loss that ends a class


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logit_t - max_{j != t} logit_j for each row, t its target."""
    own = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, targets.unsqueeze(1), -math.inf)
    return own - others.amax(1)


def gamma_fit(values: torch.Tensor) -> tuple[float, float]:
    """Maximum-likelihood (shape, scale) of a gamma distribution with location 0, for positive values (Newton)."""
    x = values.double().cpu()
    mean = x.mean()
    s = float(mean.log() - x.log().mean())
    if s <= 1e-12:  # all equal: a very peaked gamma
        return 1e6, float(mean) / 1e6
    shape = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)  # Minka's starting point
    for _ in range(50):
        a = torch.tensor(shape, dtype=torch.float64)
        f = float(a.log() - torch.special.digamma(a)) - s
        df = 1 / shape - float(torch.special.polygamma(1, a))
        step = f / df
        shape = max(shape - step, shape / 10)
        if abs(step) < 1e-10 * shape:
            break
    return shape, float(mean) / shape


def order_p_value(value: float, shape: float, scale: float, k: int) -> float:
    """1 - F(value)^k for a gamma(shape, scale) F, accurate for tiny p-values."""
    if value <= 0:
        return 1.0
    upper = torch.special.gammaincc(
        torch.tensor(shape, dtype=torch.float64), torch.tensor(value / scale, dtype=torch.float64)
    )
    return float(-torch.expm1(k * torch.log1p(-upper)))


def class_p_values(stats: torch.Tensor) -> tuple[list[float], list[dict[str, float]]]:
    """Each class's order-statistic p-value against a gamma fitted to the other classes' statistics."""
    k = len(stats)
    low = float(stats.min())
    loc = 0.0 if low > 0 else low - 1e-3 * (float(stats.max()) - low + 1)  # our shift, only when needed
    p_values, fits = [], []
    for c in range(k):
        null = torch.cat([stats[:c], stats[c + 1 :]]) - loc
        shape, scale = gamma_fit(null)
        p_values.append(order_p_value(float(stats[c]) - loc, shape, scale, k))
        fits.append({"shape": shape, "scale": scale, "loc": loc})
    return p_values, fits


def max_margins(
    model: torch.nn.Module,
    num_classes: int,
    shape: tuple[int, int, int],
    seed: int,
    precision: str,
    callback: Callback | None = None,
    chunk: int | None = None,
    classes: range | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class of `classes` (a contiguous block; None: every class), the largest margin reached from IMAGES random
    starts, and the steps each class ran.

    The classes climb in chunks of at most `chunk` classes (None: all at once), one chunk after the other. The
    classes do not interact and each chunk draws its starts from the one seeded generator in class order (torch's
    CPU generator gives the same numbers drawn in pieces as at once), so every class starts from the same images and
    takes the same steps whatever the chunking. A block starting past class 0 first draws and drops the starts of the
    classes before it.
    """
    block = range(num_classes) if classes is None else classes
    chunk = num_classes if chunk is None else max(1, min(chunk, num_classes))
    gen = torch.Generator().manual_seed(seed)
    _skip_starts(gen, block.start, shape, chunk)
    stats = torch.empty(len(block))
    steps_run = torch.zeros(len(block), dtype=torch.long)
    chunks = math.ceil(len(block) / chunk)
    began = time.perf_counter()
    with frozen(model):  # gradients go to the images only
        for c in range(chunks):
            first, end = c * chunk, min((c + 1) * chunk, len(block))

            def report(step: int, active: int, c: int = c, end: int = end) -> None:
                if callback is not None:
                    row = {"phase": "mmbd", "step": step, "steps": STEPS, "active": active, "chunk": c + 1}
                    row |= {"chunks": chunks, "classes": len(block), "classes_done": end - active}
                    callback(Event("row", row | {"elapsed": time.perf_counter() - began}))

            stats[first:end], steps_run[first:end] = _climb(model, block[first:end], shape, gen, precision, report)
    return stats, steps_run


def _skip_starts(gen: torch.Generator, classes: int, shape: tuple[int, int, int], piece: int) -> None:
    """Draw and drop the random starts of `classes` classes, `piece` classes at a time (a chunk's memory at most)."""
    for first in range(0, classes, piece):
        torch.rand((min(piece, classes - first), IMAGES, *shape), generator=gen)


def _climb(
    model: torch.nn.Module,
    classes: range,
    shape: tuple[int, int, int],
    gen: torch.Generator,
    precision: str,
    report: Callable[[int, int], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """MM-BD's climb for one chunk of classes: (largest margins, steps run), on the CPU."""
    device = next(model.parameters()).device
    n = len(classes)
    x = torch.rand((n, IMAGES, *shape), generator=gen).to(device)
    targets = torch.tensor(list(classes), device=device).repeat_interleave(IMAGES)
    active = torch.ones(n, dtype=torch.bool, device=device)
    last = torch.full((n,), math.inf, device=device)
    steps_run = torch.zeros(n, dtype=torch.long, device=device)
    shown = None
    for step in range(STEPS):
        live = active.nonzero().squeeze(1)
        if len(live) == 0:
            break
        xs = x[live].requires_grad_(True)
        flat = xs.clamp(0, 1).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(flat)
        m = margins(logits.float(), targets.view(n, IMAGES)[live].flatten()).view(len(live), IMAGES)
        loss = -m.sum(1)  # per class, as the published per-class loop
        (grad,) = torch.autograd.grad(loss.sum(), xs)
        with torch.no_grad():
            x[live] = xs - STEP_SIZE * grad
            steps_run[live] += 1
            done = (last[live] - loss).abs() / last[live].abs() < TOLERANCE
            last[live] = loss.detach()
            active[live[done]] = False
        if (step + 1) % 25 == 0:
            shown = (step + 1, int(active.sum()))
            report(*shown)
    final = (int(steps_run.max()), 0)  # the chunk's end (no class climbs any more), so progress moves on
    if shown != final:
        report(*final)
    with torch.no_grad():  # the statistic, in fp32 at the final inputs
        logits = model(x.clamp(0, 1).flatten(0, 1).contiguous(memory_format=torch.channels_last)).float()
        stats = margins(logits, targets).view(n, IMAGES).amax(1)
    return stats.cpu(), steps_run.cpu()


class MaxMargin(Detector):
    name = "mmbd"
    needs_data = False
    loop_kind = "mmbd"
    summary = "largest reachable logit margin per class (MM-BD, data-free); order-statistic p-value"

    def images_per_class(self, inputs: ScanInputs) -> int:
        return IMAGES

    def run(self, inputs: ScanInputs, callback: Callback | None = None) -> DetectorReport:
        began = time.perf_counter()
        model, ranks = inputs.model, inputs.ranks
        num_classes = model.spec.num_classes
        chunk = inputs.chunk(IMAGES, num_classes)
        block = class_block(num_classes, ranks)
        stats, steps_run = max_margins(
            model, num_classes, model.spec.input_size, inputs.seed, inputs.precision, callback, chunk, block
        )
        if ranks.parallel:  # the rows travel on the rank's device (nccl)
            device = next(model.parameters()).device
            stats = gather_rows(stats.to(device), num_classes, ranks).cpu()
            steps_run = gather_rows(steps_run.to(device), num_classes, ranks).cpu()
        p_values, fits = class_p_values(stats)
        flagged = sorted((c for c, p in enumerate(p_values) if p < inputs.alpha), key=lambda c: p_values[c])
        rows: list[dict[str, Any]] = [
            {
                "index": c,
                "statistic": float(stats[c]),
                "score": p_values[c],
                "flagged": c in flagged,
                "max_margin": float(stats[c]),
                "p_value": p_values[c],
                "null_gamma": fits[c],
                "steps_run": int(steps_run[c]),
            }
            for c in range(len(stats))
        ]
        doc = {
            "alpha": inputs.alpha,
            "images_per_class": IMAGES,
            "steps": STEPS,
            "step_size": STEP_SIZE,
            "chunk_classes": chunk,
            "chunks": math.ceil(num_classes / chunk),
            "seconds": time.perf_counter() - began,
        }
        return DetectorReport(self.name, "p_value", "max_margin", rows, flagged, doc)


DETECTORS.register("mmbd")(MaxMargin())
