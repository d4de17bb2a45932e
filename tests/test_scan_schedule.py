"""The screened reverse-engineering schedule (`scan --schedule screened`): every class a quarter of the budget, then
only the most suspicious classes the rest; the stopped classes are compared at their projected full-budget size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cleanse.scan import Budget, reverse_triggers
from cleanse.scan.anomaly import flag_small
from cleanse.scan.reverse import Reversed, _most_suspicious, projected_sizes

K = 20
TARGET = 13


class ManyClasses(nn.Module):
    """K classes on 6x6 images; class TARGET also answers a bright top-left pixel (a planted backdoor)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.conv(x)).flatten(1))
        corner = torch.zeros_like(out)
        corner[:, TARGET] = 20 * x[:, :, 0, 0].mean(1)
        return out + corner


def _data(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(n, 6, 6, 3, generator=gen) * 100).to(torch.uint8), torch.arange(n) % K


def test_the_screen_keeps_the_most_suspicious_and_stops_the_rest():
    budget = Budget(steps=300, batch=16, round_steps=5, patience=1).screened()
    assert budget.screen_steps == 75 and budget.kept_classes(K) == 4 and budget.kept_classes(5) == 3
    assert budget.kept_classes(2) == 2
    images, labels = _data()
    rev = reverse_triggers(ManyClasses().eval(), images, labels, list(range(K)), budget, seed=1)
    assert rev.screened_out is not None and rev.screen_size is not None
    kept = ~rev.screened_out
    assert int(kept.sum()) == 4 and bool(kept[TARGET])
    # the kept classes: the smallest working triggers when the screen ended (round 15), the classes without one
    # after them by attack success
    screen_end = rev.history[14]
    assert screen_end["screened_out"] == rev.screened_out.tolist()
    rank = sorted(range(K), key=lambda c: (screen_end["best_size"][c], -screen_end["attack_success"][c], c))
    assert set(torch.nonzero(kept).flatten().tolist()) == set(rank[:4])
    assert rev.steps_run[rev.screened_out].tolist() == [75] * 16 and rev.steps_run[kept].tolist() == [300] * 4
    # a stopped class keeps its screen-end best state; the kept ones shrink further or hold
    working = rev.screened_out & torch.isfinite(rev.screen_size)
    assert bool(working.any()) and torch.equal(rev.size[working], rev.screen_size[working])
    assert bool((rev.size[kept] <= rev.screen_size[kept]).all())


def test_the_screened_schedule_flags_the_planted_target_among_many_classes_as_the_full_one_does():
    images, labels = _data()
    full = Budget(steps=300, batch=16, round_steps=5, patience=1)
    every = reverse_triggers(ManyClasses().eval(), images, labels, list(range(K)), full, seed=1)
    screened = reverse_triggers(ManyClasses().eval(), images, labels, list(range(K)), full.screened(), seed=1)
    sizes, shrink = projected_sizes(screened)
    assert shrink < 0
    assert flag_small(every.size, 3.5, "log", "loo-z") == [TARGET]
    assert flag_small(sizes, 3.5, "log", "loo-z") == [TARGET]
    assert int(screened.steps_run.sum()) == 16 * 75 + 4 * 300 < 0.45 * int(every.steps_run.sum())


def _reversed(size, screen, out, steps, reached=None) -> Reversed:
    n = len(size)
    return Reversed(
        list(range(n)),
        {},
        torch.tensor(size),
        torch.ones(n),
        torch.tensor(reached if reached is not None else [True] * n),
        torch.ones(n),
        torch.tensor(steps),
        screened_out=torch.tensor(out),
        screen_size=torch.tensor(screen),
    )


def test_projected_sizes_by_hand():
    # classes 0-2 ran on and shrank by 1/2, 1/4 and 1/2 (median log shrink log 1/2); 3 and 4 were stopped at the
    # screen; 5 stopped early (done before the screen: not scaled)
    rev = _reversed(
        [1.0, 1.0, 2.0, 10.0, 20.0, 7.0],
        [2.0, 4.0, 4.0, 10.0, 20.0, 7.0],
        [False, False, False, True, True, False],
        [100, 100, 100, 25, 25, 15],
    )
    sizes, shrink = projected_sizes(rev)
    assert shrink == pytest.approx(math.log(0.5))
    assert sizes.tolist() == pytest.approx([1.0, 1.0, 2.0, 5.0, 10.0, 7.0])


def test_projected_sizes_leave_an_unscreened_run_and_an_unreached_class_alone():
    plain = _reversed([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [False, False, False], [10, 10, 10])
    assert projected_sizes(plain) == (plain.size, 0.0)
    # class 2 never reached the success level: its size is a lower bound, not scaled
    rev = _reversed([1.0, 5.0, 9.0], [2.0, 5.0, 9.0], [False, True, True], [100, 25, 25], [True, True, False])
    sizes, shrink = projected_sizes(rev)
    assert shrink == pytest.approx(math.log(0.5)) and sizes.tolist() == pytest.approx([1.0, 2.5, 9.0])


def test_the_most_suspicious_are_the_smallest_then_the_unreached_by_success_then_by_index():
    sizes = torch.tensor([3.0, math.inf, 1.0, 3.0, 2.0, math.inf, math.inf])
    success = torch.tensor([1.0, 0.2, 1.0, 1.0, 1.0, 0.7, 0.2])
    assert torch.nonzero(_most_suspicious(sizes, success, 3)).flatten().tolist() == [0, 2, 4]  # 0 before 3: index
    assert torch.nonzero(_most_suspicious(sizes, success, 5)).flatten().tolist() == [0, 2, 3, 4, 5]
    assert torch.nonzero(_most_suspicious(sizes, success, 6)).flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_scan_cli_screened_schedule_reports_the_screen(untrained_files, tmp_path):
    import json

    from typer.testing import CliRunner

    from cleanse.cli import app

    args = ["scan", str(untrained_files / "bd.safetensors"), "--data", "synthetic:test", "--detectors", "patch"]
    args += ["--budget", "fast", "--steps", "20", "--n-clean", "60", "--schedule", "screened", "--json"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "s")])
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(result.stdout)
    assert doc["schedule"] == "screened" and doc["screen_steps"] == 5
    patch = doc["detectors"]["patch"]
    assert patch["schedule"] == "screened" and patch["kept_after_screen"] == 3
    rows = patch["classes"]
    stopped = [r for r in rows if r["screened_out"]]
    assert len(stopped) == patch["screened_out"] and all(r["steps_run"] == 5 for r in stopped)
    assert all(r["steps_run"] <= 20 for r in rows) and sum(not r["screened_out"] for r in rows) >= 3
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["parameters"]["schedule"] == "screened"


def test_auto_screens_the_full_budget_and_gives_shorter_budgets_every_step():
    from cleanse.jobs.scan import ScanOptions, _plan

    def screen(**kwargs) -> int:
        return _plan(ScanOptions("m.safetensors", data="synthetic:test", **kwargs))[0].screen_steps

    assert screen() == 150  # full: 600 steps, a quarter of them for every class
    assert screen(budget="fast") == 0  # 200 steps: every class the whole budget
    assert screen(budget="fast", schedule="screened") == 50
    assert screen(schedule="every") == 0
    assert screen(steps=1000) == 250
