"""The scan's detectors on hand-made models and numbers: the trigger families, MM-BD's statistic and null, and the
combined verdict."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from cleanse.scan.detectors.base import DetectorReport
from cleanse.scan.detectors.mmbd import class_p_values, gamma_fit, margins, max_margins, order_p_value
from cleanse.scan.families import ADDITIVE, PATCH, WARP, identity_grid
from cleanse.scan.reverse import Budget, reverse_triggers
from cleanse.scan.verdict import combine

SIZE = 8


def _images(n: int, base: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N,8,8,3) images with a random brightness per image and channel (around `base` when given), and
    labels 0,1,2,0,1,2,..."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, SIZE, SIZE, generator=gen) - 0.5
    x = (0.5 + 0.4 * noise) if base is None else (base + 0.05 * noise)
    x = (x + 0.3 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), torch.arange(n) % 3


class Planted(nn.Module):
    """Classes 0 and 1 answer to the image's colour (red minus green brightness), which neither a faint signal nor
    a warp changes much; class 2 answers strongly to the direction `planted` (a backdoor's shortcut)."""

    def __init__(self, planted: torch.Tensor, gain: float = 200.0) -> None:
        super().__init__()
        self.register_buffer("planted", gain * planted.flatten() / planted.norm())
        self.colour = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.colour * (x[:, 0].mean((1, 2)) - x[:, 1].mean((1, 2)))
        return torch.stack([d, -d, (x.flatten(1) - 0.5) @ self.planted - 6], 1)


def _stripes() -> torch.Tensor:
    cols = torch.arange(SIZE, dtype=torch.float32)
    return torch.sin(2 * math.pi * cols / 4).view(1, 1, SIZE).expand(3, SIZE, SIZE)


def test_additive_reversal_recovers_a_planted_signal():
    signal = _stripes()
    model = Planted(signal).eval()
    images, labels = _images(90)
    budget = Budget(steps=150, batch=16, round_steps=5, patience=1)
    rev = reverse_triggers(model, images, labels, [0, 1, 2], budget, seed=0, family=ADDITIVE)
    assert rev.tensors["delta"].shape == (3, 3, SIZE, SIZE)
    assert bool(rev.reached[2])
    assert rev.size[2] < 0.3 * min(rev.size[0], rev.size[1])  # RMS grey levels: the planted class is far easier
    cosine = torch.nn.functional.cosine_similarity(rev.tensors["delta"][2].flatten(), signal.flatten(), dim=0)
    assert cosine > 0.9  # the reversed signal is the planted one
    # The size is the RMS of delta on the 0-255 scale.
    assert rev.size[2].item() == pytest.approx(float((rev.tensors["delta"][2] * 255).square().mean().sqrt()), rel=1e-3)
    trig = ADDITIVE.trigger({"delta": rev.tensors["delta"][2]}, 2, (3, SIZE, SIZE), "fast")
    assert trig.kind == "additive" and trig.origin == "scan" and trig.target == 2
    # the smallest trigger that worked on 16-image batches sits near the 90% boundary on all 60 others
    x = images[labels != 2].permute(0, 3, 1, 2).float() / 255
    assert (model(trig.apply(x)).argmax(1) == 2).float().mean() > 0.7


def test_warp_reversal_recovers_a_planted_shift():
    pattern = 0.5 + 0.3 * _stripes()
    # class 2 answers to the stripes moved one pixel to the right: its weight is the change that shift makes
    shifted = torch.roll(pattern, 1, dims=2)
    model = Planted(shifted - pattern).eval()
    images, labels = _images(90, pattern)
    budget = Budget(steps=200, batch=16, round_steps=5, patience=1)
    rev = reverse_triggers(model, images, labels, [0, 1, 2], budget, seed=0, family=WARP)
    grid = rev.tensors["grid"]
    assert grid.shape == (3, SIZE, SIZE, 2)
    assert bool(rev.reached[2])
    flow_px = (grid[2] - identity_grid(SIZE, SIZE))[..., 0] * (SIZE - 1) / 2  # x displacement in pixels
    # grid_sample reads the input at (x + flow): content moves right where the flow points left
    assert flow_px[:, 1:-1].mean() < -0.2
    # a warp moves pixels, not colours: classes 0 and 1 stay out of reach (their sizes are where they gave up)
    assert rev.reached.tolist() == [False, False, True] and rev.size[2] < 1.0
    trig = WARP.trigger({"grid": grid[2]}, 2, (3, SIZE, SIZE), "fast")
    assert trig.kind == "warp" and trig.align_corners
    # The smallest warp that worked on 16-image batches sits near the 90% boundary, so on all 60 others it moves
    # most but not a fixed share: 0.65-1.0 over scan seeds 0-2 on an AVX2 CPU (fp32), above 0.7 on AVX-512; no image
    # goes to class 2 without it.
    x = images[labels != 2].permute(0, 3, 1, 2).float() / 255
    assert (model(x).argmax(1) == 2).float().mean() == 0
    assert (model(trig.apply(x)).argmax(1) == 2).float().mean() > 0.5


def test_each_family_sizes_by_hand():
    zeros = [torch.zeros(2, 2, 4, 4)]
    assert torch.allclose(WARP.size(zeros), torch.zeros(2), atol=1e-5)
    shift = [torch.ones(1, 2, 4, 4) * torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)]  # a uniform (3, 4) px move
    assert WARP.size(shift).item() == pytest.approx(5.0, rel=1e-4)
    grid = WARP.tensors(shift, (3, 9, 9))["grid"][0]
    moved = (grid - identity_grid(9, 9))[4, 4] * 4  # the centre pixel, grid units -> pixels ((9 - 1) / 2 per unit)
    assert torch.allclose(moved, torch.tensor([3.0, 4.0]), atol=1e-4)
    delta = [torch.full((1, 3, 2, 2), 10.0)]
    assert ADDITIVE.size(delta).item() == pytest.approx(10.0, rel=1e-5)  # RMS on the 0-255 scale
    assert torch.allclose(ADDITIVE.tensors(delta, (3, 2, 2))["delta"], torch.full((1, 3, 2, 2), 10 / 255))
    mask = PATCH.init([0, 1], (3, 4, 4), seed=0)
    assert PATCH.size(mask).tolist() == pytest.approx([16 * 0.0025] * 2, rel=1e-3)


def test_margin_is_own_logit_minus_the_largest_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert margins(logits, torch.tensor([0, 2])).tolist() == [1.0, -6.0]


def test_gamma_fit_solves_the_likelihood_equation_and_recovers_the_parameters():
    values = torch.distributions.Gamma(3.0, 2.0).sample((4000,))  # shape 3, rate 2 (scale 0.5)
    shape, scale = gamma_fit(values)
    assert shape == pytest.approx(3.0, rel=0.1) and scale == pytest.approx(0.5, rel=0.1)
    x = values.double()
    s = float(x.mean().log() - x.log().mean())
    a = torch.tensor(shape, dtype=torch.float64)
    assert float(a.log() - torch.special.digamma(a)) == pytest.approx(s, abs=1e-8)  # d logL / d shape = 0
    assert shape * scale == pytest.approx(float(x.mean()), rel=1e-9)  # d logL / d scale = 0


def test_order_p_value_by_hand():
    # shape 1 is the exponential: F(v) = 1 - exp(-v / scale); p = 1 - F(v)^k
    for v, k in ((1.0, 3), (5.0, 10), (40.0, 10)):
        expected = 1 - (1 - math.exp(-v / 2.0)) ** k
        assert order_p_value(v, 1.0, 2.0, k) == pytest.approx(expected, rel=1e-6)
    assert order_p_value(80.0, 1.0, 1.0, 10) == pytest.approx(10 * math.exp(-80), rel=1e-6)  # no cancellation
    assert order_p_value(-1.0, 1.0, 1.0, 10) == 1.0


def test_class_p_values_single_out_the_large_margin():
    stats = torch.tensor([0.8, 1.1, 0.9, 12.0, 1.0, 0.7, 1.2, 0.95, 1.05, 0.85])
    p, fits = class_p_values(stats)
    assert p[3] < 1e-6 and min(p[:3] + p[4:]) > 0.05
    shape, scale = gamma_fit(torch.cat([stats[:3], stats[4:]]))
    assert p[3] == pytest.approx(order_p_value(12.0, shape, scale, 10), rel=1e-9)  # the published p-value
    assert fits[3]["loc"] == 0.0
    shifted, fits = class_p_values(stats - 1.0)  # non-positive margins: the null is shifted below the smallest
    assert fits[0]["loc"] < -0.3 and shifted[3] < 1e-6


class Backdoored(nn.Module):
    """4 classes; class 1's logit can grow far beyond the others' (a shortcut), the others are capped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((1, 2, 3))
        corner = x[:, :, :2, :2].mean((1, 2, 3))
        capped = torch.stack([torch.tanh(x[:, c].mean((1, 2)) * 4) for c in (0, 2)], 1)
        return torch.stack([capped[:, 0], 30 * corner - 10, capped[:, 1], torch.tanh(mean)], 1)


def test_max_margins_climb_and_mmbd_flags_the_shortcut_class():
    model = Backdoored()
    model.register_parameter("anchor", nn.Parameter(torch.zeros(1)))  # the detector reads the device from it
    stats, steps = max_margins(model, 4, (3, 8, 8), seed=0, precision="fp32")
    assert stats[1] > 15 and (stats[[0, 2, 3]] < 2).all()
    assert (steps >= 1).all() and (steps <= 300).all()
    p, _ = class_p_values(stats)
    assert min(range(4), key=lambda c: p[c]) == 1


def _report(name: str, score: str, scores: list[float], flagged: list[int], small: list[int] = ()) -> DetectorReport:
    rows = [
        {"index": k, "statistic": s, "score": s, "flagged": k in flagged, "small_side": k in small or k in flagged}
        for k, s in enumerate(scores)
    ]
    return DetectorReport(name, score, "x", rows, flagged, {})


def test_combined_verdict_prefers_the_reversal_detectors_targets():
    patch = _report("patch", "anomaly_index", [0.5, 0.2, 4.0, 2.5], [2])
    warp = _report("warp", "anomaly_index", [0.3, 5.0, 3.8, 0.1], [1, 2])
    mmbd = _report("mmbd", "p_value", [0.9, 0.8, 0.7, 1e-9], [3])
    verdict = combine({"patch": patch, "warp": warp, "mmbd": mmbd}, {"patch", "warp"})
    assert verdict["backdoored"] is True
    # class 2 flagged by two detectors first, then class 1 (one); mmbd's class 3 is corroborated by nothing:
    # patch's 2.5 is on the large side
    assert verdict["suspected_targets"] == [2, 1]
    assert verdict["unconfirmed"] == [3]
    assert verdict["evidence"] == {"1": ["warp"], "2": ["patch", "warp"], "3": ["mmbd"]}


def test_a_data_free_flag_counts_alone_without_data_and_with_corroboration_with_it():
    mmbd = _report("mmbd", "p_value", [0.9, 1e-4, 0.02, 0.5], [1, 2])
    verdict = combine({"mmbd": mmbd}, set())
    assert verdict["backdoored"] and verdict["suspected_targets"] == [1, 2]  # smaller p first
    # class 1: patch places it on the small side at z 2.2 (>= 2, below the 3.5 that flags alone): corroborated;
    # class 2: z 1.9 on the small side: not enough
    patch = _report("patch", "anomaly_index", [0.5, 2.2, 1.9, 0.1], [], small=[1, 2])
    verdict = combine({"patch": patch, "mmbd": mmbd}, {"patch"})
    assert verdict["backdoored"] and verdict["suspected_targets"] == [1] and verdict["unconfirmed"] == [2]
    alone = combine({"patch": _report("patch", "anomaly_index", [0.5, 2.2, 1.9, 0.1], []), "mmbd": mmbd}, {"patch"})
    assert alone["backdoored"] is False and alone["unconfirmed"] == [1, 2]  # z 2.2 but on the large side
    clean = combine({"patch": patch, "mmbd": _report("mmbd", "p_value", [0.9] * 4, [])}, {"patch"})
    assert clean == {
        "backdoored": False,
        "suspected_targets": [],
        "unconfirmed": [],
        "evidence": {},
        "rule": clean["rule"],
    }


SHORTCUT_NET = '''
import torch
from torch import nn


class Shortcut(nn.Module):
    """Class 1 answers a bright top-left corner far more strongly than any natural class answers anything."""

    def __init__(self, num_classes):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(30.0))

    def forward(self, x):
        corner = x[:, :, :2, :2].mean((1, 2, 3))
        capped = [torch.tanh(x[:, c].mean((1, 2))) for c in range(3)]
        return torch.stack([capped[0], self.gain * corner - 10, capped[1], capped[2]], 1)


def build(num_classes):
    return Shortcut(num_classes)
'''


def test_data_free_scan_of_a_users_model_flags_the_shortcut_class(tmp_path):
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from cleanse.cli import app

    (tmp_path / "net.py").write_text(SHORTCUT_NET)
    save_file({"gain": torch.tensor(30.0)}, tmp_path / "raw.safetensors")
    arch = ["--arch", f"{tmp_path / 'net.py'}:build", "--num-classes", "4", "--input-size", "3,8,8"]
    args = ["scan", str(tmp_path / "raw.safetensors"), *arch, "--mean", "0,0,0", "--std", "1,1,1"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 1, result.output  # no --data: MM-BD alone, and it flags class 1
    doc = json.loads(result.stdout)
    assert doc["detectors_run"] == ["mmbd"] and doc["suspected_targets"] == [1] and doc["evidence"] == {"1": ["mmbd"]}
    rows = doc["detectors"]["mmbd"]["classes"]
    assert rows[1]["p_value"] < 0.05 and all(r["p_value"] > 0.05 for k, r in enumerate(rows) if k != 1)
    assert rows[1]["max_margin"] > 10 and doc["classes"][1]["mmbd"]["flagged"] is True
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["run.json", "scan.json"]  # no reversal, no PNGs


def test_a_class_out_of_reach_gives_up_half_way_when_early_stopping():
    pattern = 0.5 + 0.3 * _stripes()
    model = Planted(torch.roll(pattern, 1, dims=2) - pattern).eval()
    images, labels = _images(90, pattern)
    budget = Budget(steps=100, batch=16, round_steps=5, patience=1, early_stop=2)
    rev = reverse_triggers(model, images, labels, [0, 1, 2], budget, seed=0, family=WARP)
    assert rev.reached.tolist() == [False, False, True]
    assert rev.steps_run[:2].tolist() == [50, 50]  # out of reach at the round ending on step 50: they leave
    assert rev.history[9]["active"][:2] == [False, False] and rev.history[8]["active"][:2] == [True, True]
    fixed = reverse_triggers(model, images, labels, [0, 1], replace(budget, early_stop=0), seed=0, family=WARP)
    assert fixed.steps_run.tolist() == [100, 100]  # without early stopping every class runs the whole budget
