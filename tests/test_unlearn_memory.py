"""unlearn's memory plan: a recipe's batch stepped in pieces that fit --memory-budget gives the whole batch's step.

`RecipeRun.step_pieces` weights each piece's loss by its share of the batch rows and adds the gradients, so where the
model runs in eval mode (tar-ewc, grad-prune and act-edit freeze BatchNorm) or has neither BatchNorm nor dropout (the
tiny ViT), a run cut into pieces of at most 5 rows ends where the uncut run does. The plan's and the pieces'
arithmetic and the training probe are checked against hand counts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import tiny_archs
import torch
from conftest import synthetic
from helpers import error_line, run_recipe
from torch import nn
from typer.testing import CliRunner

from cleanse.attacks import poison_dataset
from cleanse.cli import app
from cleanse.engine.memory import MemoryPlan, saved_bytes_per_image
from cleanse.models import ClassifierModel, new_model
from cleanse.recipes import RECIPES
from cleanse.recipes.tar_ewc import fisher_chunk
from cleanse.record import record_path
from cleanse.training_defaults import data_normalization

runner = CliRunner()


def test_rows_per_forward_by_hand() -> None:
    # per image: 100 saved bytes + 4 copies of a 10-byte image = 140
    plan = MemoryPlan(budget=1000, source="--memory-budget", saved_per_image=100, image_bytes=10)
    assert plan.per_image == 140
    assert plan.rows_per_forward() == 7  # 1000 // 140
    assert plan.rows_per_forward(2) == 3  # 1000 // 280: a clean row and its triggered copy
    capped = MemoryPlan(1000, "x", 100, 10, forward_bytes=300)
    assert capped.rows_per_forward() == 2  # the CPU cap, below the budget: 300 // 140
    assert MemoryPlan(10, "x", 100, 10).rows_per_forward(2) == 1  # never below one row


def test_a_batch_is_cut_into_near_equal_pieces_and_ranks_cut_theirs_alike() -> None:
    from types import SimpleNamespace

    from cleanse.engine.distributed import Ranks
    from cleanse.recipes.base import RecipeRun

    run = RecipeRun.__new__(RecipeRun)  # `pieces` needs the plan, the ranks and the global batch's rows
    run.ctx = SimpleNamespace(memory=_pieces_of(13))
    run.ranks = Ranks()
    assert run.pieces(128) == 10  # ceil(128 / 13): pieces of 13 x 8 and 12 x 2, never a 11-row tail of 1
    assert run.pieces(128, images_per_row=2) == 22  # 6 rows (12 images) a forward
    assert run.pieces(13) == 1
    run.ctx = SimpleNamespace(memory=None)
    assert run.pieces(128) == 1  # no plan: whole batches
    # two ranks, a global batch of 43 rows: shards of 22 and 21; 7 rows a forward -> 4 pieces on both
    run.ctx, run.batch_rows = SimpleNamespace(memory=_pieces_of(7)), torch.arange(43)
    for rank in (0, 1):
        run.ranks = Ranks(rank, 2)
        assert run.pieces(22 - rank) == 4
    run.ctx = SimpleNamespace(memory=_pieces_of(1))
    assert run.pieces(22) == run.pieces(21) == 21  # never more pieces than the smaller shard has rows


def test_a_resumed_run_cuts_its_batches_as_the_interrupted_one_did() -> None:
    from types import SimpleNamespace

    from cleanse.engine.distributed import SINGLE
    from cleanse.jobs.unlearn import _memory_plan

    data = synthetic("train")
    model = new_model("cnn", 10, data.classes, (3, 32, 32), None, None, {"width": "8,16,16"}, seed=0)
    loaded = SimpleNamespace(model=model, split=object(), precision="fp32", device=torch.device("cpu"))
    fresh = _memory_plan(loaded, None, SINGLE, None)
    assert fresh is not None and fresh.rows_per_forward() > 3
    state = SimpleNamespace(extra={"images_per_forward": 3})
    resumed = _memory_plan(loaded, None, SINGLE, state)
    assert resumed is not None and resumed.rows_per_forward() == 3 and resumed.rows_per_forward(2) == 1
    assert resumed.source == "the interrupted run's (--resume)"
    assert _memory_plan(SimpleNamespace(**{**vars(loaded), "split": None}), None, SINGLE, state) is None


def test_the_training_probe_counts_what_a_weight_update_saves_and_moves_no_statistic() -> None:
    # A linear layer on a flattened 3x4x4 image: a weight update saves its input (48 floats = 192 bytes an image);
    # the scan's frozen probe, whose input takes the gradient, saves nothing for it (the weight is a parameter).
    linear = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    assert saved_bytes_per_image(linear, (3, 4, 4), training=True) == 192
    assert saved_bytes_per_image(linear, (3, 4, 4)) == 0
    with_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2)).train()
    before = copy.deepcopy(with_bn.state_dict())
    assert saved_bytes_per_image(with_bn, (3, 4, 4), training=True) > 0
    after = with_bn.state_dict()
    assert with_bn.training and all(torch.equal(before[k], after[k]) for k in before)


def test_the_automatic_fisher_chunk_fits_one_forward() -> None:
    small = nn.Linear(4, 2)
    assert fisher_chunk(small) == 32 and fisher_chunk(small, 0, 5) == 5 and fisher_chunk(small, 0, 100) == 32
    assert fisher_chunk(small, 7, 3) == 7  # a chunk the user gave is kept


def _run(name: str, model: ClassifierModel, params: dict[str, Any], trigger, memory: MemoryPlan | None):
    return run_recipe(name, params, model, trigger, n=80, memory=memory)


def _pieces_of(rows: int) -> MemoryPlan:
    """A plan whose forwards hold `rows` images."""
    return MemoryPlan(budget=rows * 1000, source="test", saved_per_image=1000, image_bytes=0)


def _same_run(a: tuple, b: tuple, atol: float) -> None:
    (net_a, result_a), (net_b, result_b) = a, b
    sa, sb = net_a.net.state_dict(), net_b.net.state_dict()
    assert max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa) < atol
    assert len(result_a.history) == len(result_b.history)
    for ra, rb in zip(result_a.history, result_b.history, strict=True):
        for key in ("loss", "clean_ce", "ascent", "clean_accuracy", "attack_success_rate"):
            if isinstance(ra.get(key), float):
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), key


def _cnn() -> ClassifierModel:
    data = synthetic("train")
    mean, std = data_normalization(data)
    return new_model("cnn", 10, data.classes, (3, 32, 32), mean, std, {"width": "8,16,16"}, seed=0)


def _vit() -> ClassifierModel:
    torch.manual_seed(0)
    return new_model("vit", 10, arch_args=tiny_archs.VIT_ARGS)


# Recipes whose steps go through step_pieces, each on a model where pieces are exact: BatchNorm in eval mode (tar-ewc,
# grad-prune and act-edit freeze it), or none (the ViT: finetune and ulrl train in train mode).
PIECED = [
    ("tar-ewc", _cnn, {"epochs": 1, "recovery_epochs": 1, "fisher_samples": 16, "batch_size": 24}),
    ("grad-prune", _cnn, {"epochs": 1, "batch_size": 24}),
    ("act-edit", _cnn, {"epochs": 1, "batch_size": 24}),
    ("finetune", _vit, {"epochs": 2, "batch_size": 32}),
    ("ulrl", _vit, {"unlearn_epochs": 2, "epochs": 2, "unlearn_acc": 0.0, "batch_size": 32}),
]


@pytest.mark.parametrize(("name", "model", "params"), PIECED, ids=[c[0] for c in PIECED])
def test_a_recipe_in_pieces_ends_where_its_whole_batches_do(name: str, model, params: dict[str, Any]) -> None:
    start = model()
    _, trigger = poison_dataset(synthetic("train"), "badnets", 0, 0.1, seed=0)
    whole = _run(name, start, params, trigger, None)
    cut = _run(name, start, params, trigger, _pieces_of(5))  # 5 rows a forward, 2 where a row is two images
    assert RECIPES.get(name).steps_in_pieces
    assert whole[1].extra.keys() == cut[1].extra.keys()
    _same_run(whole, cut, 1e-4)


def test_unlearn_records_its_memory_plan_and_refuses_a_bad_budget(untrained_files: Path, tmp_path: Path) -> None:
    model = untrained_files / "bd.safetensors"
    base = ["unlearn", str(model), "--data", "synthetic", "--method", "finetune", "--clean-n", "60", "--epochs", "1"]
    out = tmp_path / "ft.safetensors"
    result = runner.invoke(app, [*base, "--memory-budget", "1KiB", "-o", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads(record_path(out).read_text())
    memory = record["memory"]
    assert memory["budget_bytes"] == 1024 and memory["budget_source"] == "--memory-budget"
    assert memory["images_per_forward"] == 1 and memory["steps_in_pieces"] is True
    assert record["parameters"]["memory_budget"] == 1024

    bad = runner.invoke(app, [*base, "--memory-budget", "lots", "-o", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 2
    assert error_line(bad) == (
        "error: --memory-budget 'lots' is not a memory size; give bytes with an optional unit "
        "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 4GiB, 512MiB, 2GB or 1000000000"
    )
    assert not (tmp_path / "bad.safetensors").exists()


def test_running_out_of_memory_in_unlearn_is_exit_2_naming_the_flags(
    monkeypatch, untrained_files: Path, tmp_path: Path
) -> None:
    finetune = type(RECIPES.get("finetune"))

    def fail(self, ctx):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes")

    monkeypatch.setattr(finetune, "run", fail)
    out = tmp_path / "ft.safetensors"
    argv = ["unlearn", str(untrained_files / "bd.safetensors"), "--data", "synthetic", "--method", "finetune"]
    result = runner.invoke(app, [*argv, "--clean-n", "60", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        "error: out of memory in cleanse unlearn: lower --memory-budget, or the recipe's batch with --param "
        "batch_size=N, free memory on the device, or run on another --device"
    )
    assert not out.exists() and not record_path(out).exists()
