"""`ulrl`: the one-sided MAD flagging, the head finder, the re-initialisation, and the recipe end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import unlearn_removes_backdoor
from torch import nn

from cleanse.errors import CleanseError
from cleanse.recipes.base import AgnosticKeeper
from cleanse.recipes.ulrl import flag_units, last_linear, reinit_rows

K = 1.4826


def test_flag_units_odd_count_flags_the_outlier_with_the_hand_computed_z():
    # median 3; |s - 3| = 2,1,0,1,97 -> MAD 1
    flagged, z = flag_units(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert flagged.tolist() == [4]
    assert z.tolist() == pytest.approx([-2 / K, -1 / K, 0.0, 1 / K, 97 / K], rel=1e-6)


def test_flag_units_even_count_uses_the_mean_of_the_two_middle_values():
    # median (4 + 5) / 2 = 4.5; |s - 4.5| sorted 0.5,0.5,1.5,1.5,2.5,2.5,3.5,45.5 -> MAD (1.5 + 2.5) / 2 = 2
    flagged, z = flag_units(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 50.0]))
    assert flagged.tolist() == [7]
    assert float(z[7]) == pytest.approx(45.5 / (K * 2))
    assert float(z[6]) == pytest.approx(2.5 / (K * 2))


def test_flag_units_is_one_sided():
    # median 5, MAD 0.5: the 0 has z = -5 / (1.4826 * 0.5) = -6.7, far out but below the median
    flagged, z = flag_units(torch.tensor([5.0, 5.0, 6.0, 7.0, 5.0, 0.0]))
    assert flagged.tolist() == []
    assert float(z[5]) == pytest.approx(-5 / (K * 0.5))
    assert float(z[3]) == pytest.approx(2 / (K * 0.5))  # 2.7 < 3.5


def test_flag_units_keeps_at_most_the_two_largest_not_the_first_two_by_index():
    # median 3, MAD 1.5: 40, 50 and 60 all pass 3.5; the published code would keep indices 1 and 3
    scores = torch.tensor([1.0, 40.0, 2.0, 50.0, 3.0, 3.0, 1.0, 2.0, 3.0, 60.0])
    flagged, z = flag_units(scores)
    assert flagged.tolist() == [9, 3]
    assert float(z[1]) == pytest.approx(37 / (K * 1.5))
    assert flag_units(scores, max_flags=3)[0].tolist() == [9, 3, 1]
    assert flag_units(scores, threshold=20.0)[0].tolist() == [9, 3]  # z 25.6 and 21.1; 40's 16.6 stays out


def test_flag_units_mad_zero_flags_nothing():
    flagged, z = flag_units(torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0]))
    assert flagged.tolist() == [] and z.tolist() == [0.0] * 5


def test_last_linear_finds_the_class_head_or_says_why_not():
    net = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3), nn.Identity())
    assert last_linear(net, 3) is net[4]
    with pytest.raises(CleanseError) as info:
        last_linear(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 10)
    assert "linear layer with 10 outputs" in info.value.message


def test_reinit_rows_gives_fresh_directions_at_the_mean_length_of_the_other_rows():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0], [6.0, 8.0], [1.0, 0.0]])  # lengths 5, 2, 10, 1
    fresh = reinit_rows(weight, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert fresh.shape == (1, 2)
    assert float(fresh.norm()) == pytest.approx((5 + 2 + 1) / 3)
    again = reinit_rows(weight, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert torch.equal(fresh, again)


def test_agnostic_keeper_never_keeps_the_start_and_prefers_later_states_within_the_margin():
    model = nn.Linear(2, 2)
    wrapper = type("W", (), {"net": model})()
    keeper = AgnosticKeeper(
        wrapper, {"clean_accuracy": 1.0, "attack_success_rate": 0.9}, ca_margin=0.02, ca_floor_drop=0.10
    )
    assert keeper.offer(wrapper, {"clean_accuracy": 0.92}, "a")  # below the start, but the start is no candidate
    assert keeper.offer(wrapper, {"clean_accuracy": 0.95}, "b")
    assert keeper.offer(wrapper, {"clean_accuracy": 0.94}, "c")  # within 0.02 of the best: later wins
    assert not keeper.offer(wrapper, {"clean_accuracy": 0.92}, "d")
    assert keeper.best["tag"] == "c"
    assert keeper.tripped({"clean_accuracy": 0.89}) == "held-back CA 0.890 fell below the floor 0.900"
    assert "start state only as a rollback fallback" in keeper.restore_best(wrapper)["rule"]


@pytest.mark.slow
def test_ulrl_flags_the_target_unit_and_removes_the_backdoor(badnets_files, tmp_path):
    out = tmp_path / "clean.safetensors"
    result, s, record = unlearn_removes_backdoor(badnets_files, "ulrl", out)
    extra = record["extra"]
    assert extra["flagged_units"] == [0]  # the BadNets target
    assert extra["flagged_z_scores"][0] > 3.5 and 1 <= extra["ascent_epochs"] <= 20
    phases = [row["phase"] for row in record["history"]]
    assert phases[-1] == "relearn" and "flag" in phases and phases.index("unlearn") < phases.index("flag")
    assert "flagged unit 0" in next(row["detail"] for row in record["history"] if row["phase"] == "flag")
    assert s["kept"]["tag"].startswith("relearn epoch")
