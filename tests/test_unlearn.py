"""The clean subset, the recipe machinery (Fisher, state rule, rollback) and `cleanse unlearn` end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.data import Dataset
from cleanse.data.subset import clean_subset
from cleanse.errors import CleanseError
from cleanse.models import save_model
from cleanse.recipes import RECIPES
from cleanse.recipes.base import StateKeeper, as_batch, joint_logits, repair_loss
from cleanse.recipes.tar_ewc import empirical_fisher

runner = CliRunner()


def labelled(n_per_class: int, classes: int = 3) -> Dataset:
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return Dataset(torch.zeros(len(labels), 4, 4, 3, dtype=torch.uint8), labels, [str(i) for i in range(classes)], "t")


def test_clean_subset_is_stratified_seeded_and_holds_back_ten_percent():
    data = labelled(100)
    data.poisoned = torch.zeros(300, dtype=torch.bool)
    data.poisoned[:10] = True  # ten class-0 rows are known poisoned: dropped first
    split = clean_subset(data, frac=0.2, seed=1)
    assert split.filtered == 10
    assert torch.bincount(split.held.labels).tolist() == [2, 2, 2]  # 10% of 18/20/20, at least 1
    assert torch.bincount(split.train.labels).tolist() == [16, 18, 18]
    assert not set(split.train_index.tolist()) & set(split.held_index.tolist())
    again = clean_subset(data, frac=0.2, seed=1)
    assert torch.equal(again.train_index, split.train_index)
    assert not torch.equal(clean_subset(data, frac=0.2, seed=2).train_index, split.train_index)
    assert len(clean_subset(data, n=30, seed=0).train) + len(clean_subset(data, n=30, seed=0).held) == 30


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frac": 0.0}, "--clean-frac 0.0 must lie in (0, 1]"),
        ({"frac": -0.5}, "--clean-frac -0.5 must lie in (0, 1]"),
        ({"frac": 1.5}, "--clean-frac 1.5 must lie in (0, 1]"),
        ({"frac": 0.01}, "leaves 1 image(s) of class 0 (0); at least 2 per class are needed"),
        ({"n": 0}, "--clean-n 0 must be a positive number"),
        ({}, "give exactly one of --clean-frac and --clean-n"),
    ],
)
def test_clean_subset_bad_requests(kwargs, message):
    with pytest.raises(CleanseError) as info:
        clean_subset(labelled(100), **kwargs)
    assert message in info.value.message


def test_empirical_fisher_matches_per_sample_gradients_and_is_mean_normalised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    fisher = empirical_fisher(model, x, y, chunk=4)
    manual = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(6):
        model.zero_grad()
        F.log_softmax(model(x[i : i + 1]), 1)[0, y[i]].backward()
        for n, p in model.named_parameters():
            manual[n] += p.grad.pow(2) / 6
    mean = sum(m.sum() for m in manual.values()) / sum(m.numel() for m in manual.values())
    for n in manual:
        assert torch.allclose(fisher[n], manual[n] / mean, rtol=1e-4, atol=1e-6)
    total = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def test_joint_logits_match_two_separate_passes_and_skip_an_empty_row_set():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).eval()
    images = torch.randint(0, 256, (6, 4, 4, 3), dtype=torch.uint8)
    triggered = torch.randint(0, 256, (6, 4, 4, 3), dtype=torch.uint8)
    x, rows = as_batch(images[:4], torch.device("cpu")), torch.tensor([1, 5])
    clean, trig = joint_logits(net, x, triggered, rows, torch.device("cpu"))
    assert clean.shape == (4, 5) and trig.shape == (2, 5)
    torch.testing.assert_close(clean, net(x))  # eval-mode BatchNorm: one pass gives exactly the two passes' figures
    torch.testing.assert_close(trig, net(as_batch(triggered[rows], torch.device("cpu"))))
    clean, trig = joint_logits(net, x, None, rows[:0], torch.device("cpu"))  # no rows: the triggered set is not read
    assert trig.shape == (0, 5)
    torch.testing.assert_close(clean, net(x))


def test_repair_loss_is_clean_ce_plus_weighted_ce_of_triggered_images_on_their_true_labels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 3, 5)).eval()
    images = torch.randint(0, 256, (6, 4, 4, 3), dtype=torch.uint8)
    triggered = torch.randint(0, 256, (6, 4, 4, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    cpu = torch.device("cpu")
    x, y, rows = as_batch(images[:4], cpu), labels[:4], torch.tensor([1, 5])
    by_hand = F.cross_entropy(net(x), y) + 0.3 * F.cross_entropy(
        net(as_batch(triggered[rows], cpu)), torch.tensor([1, 0])
    )
    torch.testing.assert_close(repair_loss(net, x, y, triggered, rows, labels, cpu, 0.3), by_hand)
    torch.testing.assert_close(repair_loss(net, x, y, None, rows[:0], labels, cpu, 0.3), F.cross_entropy(net(x), y))


def test_state_keeper_rule_prefers_low_asr_within_the_ca_margin():
    model = nn.Linear(2, 2)
    wrapper = type("W", (), {"net": model})()
    keeper = StateKeeper(
        wrapper, {"clean_accuracy": 0.90, "attack_success_rate": 0.95}, use_asr=True, ca_margin=0.02, ca_floor_drop=0.10
    )
    assert not keeper.offer(
        wrapper, {"clean_accuracy": 0.85, "attack_success_rate": 0.0}, "too costly"
    )  # CA outside margin
    assert keeper.offer(wrapper, {"clean_accuracy": 0.89, "attack_success_rate": 0.10}, "a")
    assert keeper.offer(wrapper, {"clean_accuracy": 0.88, "attack_success_rate": 0.01}, "b")
    assert not keeper.offer(wrapper, {"clean_accuracy": 0.87, "attack_success_rate": 0.00}, "c")
    assert keeper.best["tag"] == "b"
    good = StateKeeper(wrapper, {"clean_accuracy": 0.90, "attack_success_rate": 0.95}, True, 0.02, 0.10, asr_good=0.01)
    assert good.offer(wrapper, {"clean_accuracy": 0.88, "attack_success_rate": 0.0}, "unlearned")
    assert good.offer(
        wrapper, {"clean_accuracy": 0.895, "attack_success_rate": 0.008}, "recovered"
    )  # below asr_good: CA decides
    assert not good.offer(wrapper, {"clean_accuracy": 0.899, "attack_success_rate": 0.02}, "relapsed")
    assert keeper.tripped({"clean_accuracy": 0.79}) == "held-back CA 0.790 fell below the floor 0.800"
    assert keeper.tripped(loss=float("nan")) == "loss became non-finite (nan)"
    assert keeper.restore_best(wrapper)["unchanged"] is False


def test_class_changes_are_in_points_largest_first_and_skip_classes_without_images():
    from cleanse.engine.measure import class_changes

    changes = class_changes([0.9, 0.8, None, 0.5], [0.85, 0.9, 0.7, 0.5], ["a", "b", "c", "d"])
    assert [name for name, _ in changes] == ["b", "a", "d"]
    assert [round(points, 6) for _, points in changes] == [10.0, -5.0, 0.0]


def test_state_keeper_says_when_no_state_beat_the_start():
    # CIFAR-10 WaNet under act-edit: the repair removed held-back ASR but cost 2.8 points of held-back CA, so the start
    # won.
    wrapper = type("W", (), {"net": nn.Linear(2, 2)})()
    keeper = StateKeeper(
        wrapper, {"clean_accuracy": 0.968, "attack_success_rate": 0.973}, True, 0.02, 0.10, asr_good=0.01
    )
    assert not keeper.offer(wrapper, {"clean_accuracy": 0.94, "attack_success_rate": 0.0}, "repair epoch 1")
    kept = keeper.restore_best(wrapper)
    assert kept["tag"] == "start" and kept["unchanged"] is True


@pytest.fixture(scope="module")
def model_files(badnets_setup, tmp_path_factory):
    model, trigger, _ = badnets_setup
    folder = tmp_path_factory.mktemp("unlearn")
    save_model(model, folder / "bd.safetensors")
    trigger.save(folder / "bd.trigger.safetensors")
    return folder


def unlearn(folder, *args):
    return runner.invoke(
        app,
        [
            "unlearn",
            str(folder / "bd.safetensors"),
            "--data",
            "synthetic",
            "--clean-frac",
            "0.05",
            "--test",
            "synthetic:test",
            *map(str, args),
        ],
    )


@pytest.mark.slow
def test_tar_ewc_removes_the_backdoor_and_keeps_accuracy(model_files, tmp_path):
    out = tmp_path / "clean.safetensors"
    result = unlearn(
        model_files, "--method", "tar-ewc", "--trigger", model_files / "bd.trigger.safetensors", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    for side in ("before", "after"):
        for key in (
            "clean_accuracy",
            "attack_success_rate",
            "robust_accuracy",
            "tar",
            "tar_median",
            "attention_share",
            "clean_tar",
        ):
            assert key in s[side]
        assert len(s[side]["per_class_accuracy"]) == len(s["classes"]) == 10
    assert "largest per-class CA changes: " in result.stderr
    assert {"der", "wall_seconds", "ca_retention"} <= set(s)
    print(
        f"tar-ewc on synthetic: ASR {s['before']['attack_success_rate']:.3f} -> "
        f"{s['after']['attack_success_rate']:.3f}, "
        f"CA {s['before']['clean_accuracy']:.3f} -> {s['after']['clean_accuracy']:.3f}, "
        f"TAR {s['before']['tar']:.2f} -> {s['after']['tar']:.2f}"
    )
    assert s["before"]["attack_success_rate"] > 0.8 and s["after"]["attack_success_rate"] < 0.10
    assert s["after"]["clean_accuracy"] / s["before"]["clean_accuracy"] >= 0.95
    assert s["after"]["tar"] < s["before"]["tar"]
    record = json.loads(out.with_name("clean.safetensors.run.json").read_text())
    assert (
        record["command"] == "unlearn" and record["history"] and len(record["clean_subset"]["held_index"]) == 20
    )  # round(0.1 * 25) per class
    from cleanse.models import load_model

    prov = load_model(out).spec.provenance
    assert prov["recipe"] == "tar-ewc" and len(prov["parent_sha256"]) == 64


@pytest.mark.slow
def test_finetune_runs_and_rollback_happens_when_forced(model_files, tmp_path):
    result = unlearn(model_files, "--method", "finetune", "--epochs", "2", "-o", tmp_path / "ft.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["after"]["attack_success_rate"] is None  # no trigger given: not measured
    result = unlearn(
        model_files,
        "--method",
        "tar-ewc",
        "--trigger",
        model_files / "bd.trigger.safetensors",
        "--param",
        "lr=80",
        "--param",
        "asr_stop=0",
        "-o",
        tmp_path / "boom.safetensors",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert "rollback:" in result.stderr
    s = json.loads(result.stdout)
    assert s["kept"]["rollbacks"] and s["after"]["clean_accuracy"] > 0.8


@pytest.mark.slow
def test_a_recipe_that_keeps_its_start_state_warns_that_the_output_is_the_input(model_files, tmp_path):
    out = tmp_path / "same.safetensors"
    result = unlearn(model_files, "--method", "finetune", "--epochs", "0", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["kept"]["tag"] == "start" and s["kept"]["unchanged"] is True
    assert (
        f"warning: finetune kept none of its own states, so {out} has the input model's weights"
        in result.stderr.replace("\n", "")
    )
    written, given = load_file(out), load_file(model_files / "bd.safetensors")
    assert written.keys() == given.keys() and all(torch.equal(written[k], given[k]) for k in given)


def test_missing_trigger_names_both_ways_to_get_one(untrained_files, tmp_path):
    result = unlearn(untrained_files, "--method", "tar-ewc", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert "cleanse poison" in result.stderr and "cleanse scan" in result.stderr
    result = unlearn(untrained_files, "--method", "nope", "-o", tmp_path / "x.safetensors")
    assert (
        result.exit_code == 2
        and "unknown recipe 'nope'; choose one or more (comma-separated) of: act-edit, anp, clp, fine-prune, "
        "finetune, grad-prune, i-bau, nad, sau, tar-ewc, ulrl, or all"
        in result.stderr
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_method_all_runs_every_recipe_on_one_subset_and_writes_one_checkpoint_each(model_files, tmp_path):
    result = unlearn(
        model_files,
        "--method",
        "all",
        "--trigger",
        model_files / "bd.trigger.safetensors",
        "--epochs",
        "0",  # no recipe's own training: what is checked is one subset, one before, one checkpoint per recipe
        "--param",
        "max_rounds=3",
        "--param",
        "min_steps=0",
        "--param",
        "iterations=20",
        "--param",
        "teacher_epochs=0",
        "-o",
        tmp_path / "c.safetensors",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    names = [
        "act-edit",
        "anp",
        "clp",
        "fine-prune",
        "finetune",
        "grad-prune",
        "i-bau",
        "nad",
        "sau",
        "tar-ewc",
        "ulrl",
    ]
    assert sorted(doc["recipes"]) == names and doc["skipped"] == []
    befores = {json.dumps(s["before"], sort_keys=True) for s in doc["recipes"].values()}
    assert len(befores) == 1  # one before measurement, shared
    subsets = set()
    for name in names:
        assert (tmp_path / f"c.{name}.safetensors").is_file()
        record = json.loads((tmp_path / f"c.{name}.safetensors.run.json").read_text())
        assert record["parameters"]["method"] == name
        assert record["parameters"]["params"].get("epochs", 0) == 0  # anp and clp have no epochs
        subsets.add(tuple(record["clean_subset"]["train_index"]))
    assert len(subsets) == 1  # the same clean subset for every recipe
    assert "recipes compared on the same clean subset" in result.stderr


def test_method_takes_a_list_of_recipes_in_registry_order_and_names_a_bad_one():
    from cleanse.jobs.unlearn import UnlearnOptions, _plan

    plan = _plan(UnlearnOptions("m.safetensors", "d", method="nad, finetune,nad", output=Path("out.safetensors")))
    assert plan.names == ["finetune", "nad"] and plan.several and not plan.skips and plan.skipped == []
    assert plan.outputs == {n: Path(f"out.{n}.safetensors") for n in ("finetune", "nad")}
    assert not _plan(UnlearnOptions("m.safetensors", "d", method="finetune,")).several  # one recipe is one recipe
    with pytest.raises(CleanseError) as err:
        _plan(UnlearnOptions("m.safetensors", "d", method="finetune,fintune"))
    assert str(err.value) == (
        "unknown recipe 'fintune'; choose one or more (comma-separated) of: " + ", ".join(RECIPES.names()) + ", or all"
    )
    # a recipe named in a list is never skipped: without a trigger or data the list is refused, as one recipe is
    with pytest.raises(CleanseError) as err:
        _plan(UnlearnOptions("m.safetensors", "d", method="finetune,tar-ewc"))
    assert str(err.value).startswith("tar-ewc needs a trigger file: pass --trigger")
    with pytest.raises(CleanseError) as err:
        _plan(UnlearnOptions("m.safetensors", None, method="clp,finetune"))
    assert str(err.value).startswith("--data is required for finetune: the DATA to draw the clean subset from")
    assert _plan(UnlearnOptions("m.safetensors", None, method="all")).names == ["clp"]  # all skips instead


def test_a_listed_recipe_that_refuses_the_architecture_exits_2_naming_it(tmp_path):
    from helpers import MEAN, STD

    from cleanse.models import new_model

    vit = new_model("vit", 10, None, (3, 32, 32), MEAN, STD, {"depth": 1, "dim": 32, "heads": 2, "mlp": 64}, seed=0)
    save_model(vit, tmp_path / "vit.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    args = ["unlearn", str(tmp_path / "vit.safetensors"), "--data", "synthetic:test", "--clean-n", "40"]
    result = runner.invoke(app, [*args, "--method", "clp,finetune", "-o", str(out / "c.safetensors")])
    assert result.exit_code == 2 and result.stderr.startswith("error: clp "), result.output
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_method_all_without_a_trigger_skips_the_recipes_that_need_one(model_files, tmp_path):
    result = unlearn(
        model_files, "--method", "all", "--epochs", "1", "--param", "nonsense=1", "-o", tmp_path / "c.safetensors"
    )
    assert result.exit_code == 2 and "no recipe has a parameter 'nonsense'" in result.stderr
    assert not list(tmp_path.iterdir())
    # no recipe's own work (epochs 0): what is checked is which recipes run and what each writes
    result = unlearn(
        model_files,
        "--method",
        "all",
        "--epochs",
        "0",
        "--param",
        "teacher_epochs=0",
        "--param",
        "iterations=20",
        "--param",
        "min_steps=0",
        "-o",
        tmp_path / "c.safetensors",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["skipped"] == ["act-edit", "grad-prune", "tar-ewc"] and sorted(doc["recipes"]) == [
        "anp",
        "clp",
        "fine-prune",
        "finetune",
        "i-bau",
        "nad",
        "sau",
        "ulrl",
    ]
    assert "skipped act-edit, grad-prune, tar-ewc: they need a trigger" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"c.{name}.safetensors" for name in ("anp", "clp", "fine-prune", "finetune", "i-bau", "nad", "sau", "ulrl")
    ]


@pytest.mark.parametrize(
    "param, message",
    [
        ("batch_size=0", "recipe finetune parameter batch_size='0' must be positive"),
        ("lr=nan", "recipe finetune parameter lr='nan' must be a finite number >= 0"),
        ("epochs=-3", "recipe finetune parameter epochs='-3' must be a finite number >= 0"),
        ("lr=fast", "recipe finetune parameter lr='fast' is not a valid float"),
    ],
)
def test_bad_recipe_parameters_exit_2_before_any_work(untrained_files, tmp_path, param, message):
    result = unlearn(untrained_files, "--method", "finetune", "--param", param, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and message in result.stderr
    assert not list(tmp_path.iterdir())


def _synthetic_split():
    from tests.conftest import synthetic

    return clean_subset(synthetic("train"), 0.05, None, 0)


def _tar_ewc_steps_per_epoch() -> int:
    """Optimiser steps in one tar-ewc pass over the synthetic 5% subset at its default batch size."""
    from cleanse.recipes import RECIPES
    from cleanse.recipes.base import steps_per_pass

    return steps_per_pass(len(_synthetic_split().train), RECIPES.get("tar-ewc").params["batch_size"].default)


def _run_tar_ewc(model, trigger, params: dict, *, origin: str | None = None, unchecked: dict | None = None):
    """tar-ewc in-process on a copy of `model` and the synthetic 5% subset: `params` validated over the defaults,
    `unchecked` set after validation (values resolve_params would refuse); `origin` relabels the trigger."""
    import copy

    from cleanse.recipes import RECIPES
    from cleanse.recipes.base import RecipeContext

    recipe = RECIPES.get("tar-ewc")
    trigger = trigger if origin is None else dataclasses.replace(trigger, origin=origin)
    ctx = RecipeContext(
        copy.deepcopy(model),
        _synthetic_split(),
        trigger,
        {**recipe.resolve_params(params), **(unchecked or {})},
        callback=lambda e: None,
    )
    return recipe.run(ctx)


@pytest.mark.slow
def test_tar_ewc_runs_phase_1_for_reversed_min_epochs_with_a_reversed_trigger(badnets_setup):
    # A reversed trigger stops working before the true one does, so its held-back ASR must not end phase 1 early.
    model, trigger, _ = badnets_setup
    steps_per_epoch = _tar_ewc_steps_per_epoch()
    # ca_margin 1: with 20 held-back images one mistake is 5 points, and the CA rule is not under test
    true_run, reversed_run = (
        _run_tar_ewc(model, trigger, {"recovery_epochs": 0, "ca_margin": 1.0}, origin=origin)
        for origin in ("poison", "scan")
    )
    assert true_run.extra["min_unlearn_steps"] == 0
    assert true_run.extra["unlearn_steps"] < steps_per_epoch  # the true trigger breaks within the first epoch here
    assert reversed_run.extra["min_unlearn_steps"] == steps_per_epoch
    assert reversed_run.extra["unlearn_steps"] >= steps_per_epoch
    kept = reversed_run.kept["tag"]
    assert kept.startswith("unlearn step") and int(kept.rsplit(" ", 1)[1]) >= steps_per_epoch, kept


@pytest.mark.slow
def test_tar_ewc_checks_after_a_nearly_clean_batch_at_most_checks_per_epoch_times(badnets_setup):
    # Besides the schedule, a held-back check follows any step whose batch ASR is at most check_batch_asr; such extra
    # checks are capped per epoch so a held-back ASR hovering above asr_stop cannot buy a check every step.
    model, trigger, _ = badnets_setup
    steps_per_epoch = _tar_ewc_steps_per_epoch()
    assert steps_per_epoch >= 4

    def checked_steps(**params):
        # asr_stop -1 (past validation) keeps phase 1 going to the end of its epoch
        run = _run_tar_ewc(model, trigger, {"epochs": 1, "recovery_epochs": 0}, unchecked={"asr_stop": -1.0, **params})
        return [round(r["epoch"] * steps_per_epoch) for r in run.history if r["phase"] == "unlearn"]

    assert checked_steps(check_batch_asr=-1.0, checks_per_epoch=1) == [steps_per_epoch]  # schedule only
    assert checked_steps(check_batch_asr=1.0, checks_per_epoch=1) == [
        1,
        steps_per_epoch,
    ]  # every batch qualifies; cap 1
    every = steps_per_epoch // 2  # two scheduled checks; the two extra ones take the first two unscheduled steps
    scheduled = {every, 2 * every}
    extra = [s for s in range(1, steps_per_epoch + 1) if s not in scheduled][:2]
    assert checked_steps(check_batch_asr=1.0, checks_per_epoch=2) == sorted(scheduled | set(extra))


@pytest.mark.slow
def test_tar_ewc_refuses_a_reversed_min_epochs_beyond_its_epochs(badnets_setup, model_files, tmp_path):
    model, trigger, _ = badnets_setup
    with pytest.raises(
        CleanseError, match=r"reversed_min_epochs=2 is more than epochs=1, so phase 1 could never keep a state"
    ):
        _run_tar_ewc(model, trigger, {"epochs": 1, "reversed_min_epochs": 2}, origin="scan")
    reversed_file = tmp_path / "trigger-0.safetensors"
    dataclasses.replace(trigger, origin="scan").save(reversed_file)
    # --method all refuses before loading any data, not after running the recipes sorted before tar-ewc
    result = unlearn(
        model_files,
        "--method",
        "all",
        "--trigger",
        reversed_file,
        "--epochs",
        "1",
        "--param",
        "reversed_min_epochs=2",
        "-o",
        tmp_path / "c.safetensors",
    )
    assert result.exit_code == 2 and "error: tar-ewc: reversed_min_epochs=2 is more than epochs=1" in result.stderr
    assert "clean subset:" not in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trigger-0.safetensors"]
