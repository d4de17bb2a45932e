"""`unlearn --checkpoint-every N` / `--resume`: an interrupted recipe continues to the uninterrupted result.

The recipe-level tests stop a run by raising from the checkpoint writer after the k-th
checkpoint (at chosen phases), round-trip the state through the safetensors file, resume
on a fresh copy of the start model, and compare the weights bit for bit and the history
figure for figure with a run that was never stopped. The CLI tests interrupt a real
subprocess with SIGINT.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from helpers import cleanse_process, error_line, finish, wait_for
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.files import read_safetensors
from cleanse.recipes.resume import Checkpoints, RecipeState, load_recipe_state, save_recipe_state

runner = CliRunner()


class Stopped(Exception):
    pass


def run_recipe(name: str, params: dict[str, Any], model, trigger, checkpoints: Checkpoints):
    return helpers.run_recipe(name, params, model, trigger, checkpoints=checkpoints)


def without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "elapsed"} for row in history]


CASES = [
    ("finetune", {"epochs": 3}, 1, {"epoch": 1, "step": 2}),
    (
        "tar-ewc",
        {"epochs": 2, "recovery_epochs": 2, "lr": 1e-4, "fisher_samples": 64},
        1,
        {"phase": "unlearn", "epoch": 1},
    ),
    (
        "tar-ewc",
        {"epochs": 2, "recovery_epochs": 2, "lr": 1e-4, "fisher_samples": 64},
        3,
        {"phase": "recover", "epoch": 1},
    ),
    ("ulrl", {"unlearn_epochs": 3, "epochs": 2, "unlearn_acc": 0.0}, 2, {"phase": "unlearn", "epoch": 2}),
    ("ulrl", {"unlearn_epochs": 3, "epochs": 2, "unlearn_acc": 0.0}, 4, {"phase": "relearn", "epoch": 1}),
    ("sau", {"epochs": 2, "pgd_steps": 2, "min_steps": 0}, 1, {"epoch": 1}),
    ("i-bau", {"epochs": 2, "K": 2}, 1, {"epoch": 1}),
]


@pytest.mark.parametrize(
    ("name", "params", "stop_after", "where"),
    CASES,
    ids=[f"{c[0]}-{c[3].get('phase', 'epoch')}{c[3]['epoch']}" for c in CASES],
)
@pytest.mark.slow
def test_a_resumed_recipe_ends_where_the_uninterrupted_one_does(
    badnets_setup, tmp_path: Path, name: str, params: dict[str, Any], stop_after: int, where: dict[str, Any]
) -> None:
    model, trigger, _ = badnets_setup
    straight, straight_result = run_recipe(name, params, model, trigger, Checkpoints())

    saved: list[RecipeState] = []

    def save(state: RecipeState) -> None:
        saved.append(state)
        if len(saved) == stop_after:
            raise Stopped

    with pytest.raises(Stopped):
        run_recipe(name, params, model, trigger, Checkpoints(every=1, save=save))
    state = saved[-1]
    assert state.passes == stop_after and {k: state.position[k] for k in where} == where
    save_recipe_state(tmp_path / "r.resume.safetensors", state)
    loaded = load_recipe_state(tmp_path / "r.resume.safetensors")
    resumed, resumed_result = run_recipe(
        name, params, model, trigger, Checkpoints(every=1, save=lambda s: None, resume=loaded)
    )

    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert without_time(resumed_result.history) == without_time(straight_result.history)
    assert (
        resumed_result.kept["tag"] == straight_result.kept["tag"]
        and resumed_result.extra.keys() == straight_result.extra.keys()
    )
    assert resumed_result.history[-1]["elapsed"] >= state.doc["elapsed"]  # the clock continues from the checkpoint


UNLEARN_ARGS = ["--method", "finetune", "--clean-frac", "1", "--precision", "fp32", "--device", "cpu", "--seed", "2"]


@pytest.mark.slow
def test_sigint_then_resume_gives_the_uninterrupted_checkpoint(small: dict[str, Path], tmp_path: Path) -> None:
    common = [small["model"], "--data", small["data"], "--epochs", "5", *UNLEARN_ARGS]
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    state = tmp_path / "resumed.resume.safetensors"
    reference, ref_lines = cleanse_process(["unlearn", *common, "-o", straight], small["cache"])
    proc, lines = cleanse_process(["unlearn", *common, "-o", resumed, "--checkpoint-every", "2"], small["cache"])
    wait_for(state.exists, proc, lines)
    proc.send_signal(signal.SIGINT)
    rc, stderr = finish(proc, lines)
    assert rc == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGINT)") and "rerun the same command with --resume to continue" in last, (
        stderr
    )
    assert "Traceback" not in stderr
    assert state.is_file() and not resumed.exists() and not Path(f"{resumed}.run.json").exists()
    assert finish(reference, ref_lines)[0] == 0

    other = runner.invoke(app, ["unlearn", *map(str, common), "-o", str(resumed), "--resume", "--seed", "3"])
    assert other.exit_code == 2 and "the checkpoint was written for another --seed (2 vs 3)" in error_line(other)
    more = runner.invoke(app, ["unlearn", *map(str, common), "-o", str(resumed), "--resume", "--epochs", "6"])
    assert more.exit_code == 2 and "the checkpoint was written for another --param/--epochs" in error_line(more)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' OMP_NUM_THREADS=1: the same arithmetic
    try:
        done = runner.invoke(app, ["unlearn", *map(str, common), "-o", str(resumed), "--resume", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output
    assert "resuming finetune from" in done.stderr and not state.exists()
    a, _ = read_safetensors(straight)
    b, _ = read_safetensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads(Path(f"{resumed}.run.json").read_text())
    straight_record = json.loads(Path(f"{straight}.run.json").read_text())
    assert record["parameters"]["resumed_after_pass"] in (2, 4) and record["parameters"]["checkpoint_every"] == 2
    assert without_time(record["history"]) == without_time(straight_record["history"])
    assert json.loads(done.stdout)["after"] == straight_record["after"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "all", "--checkpoint-every", "1"],
            "--checkpoint-every takes one recipe, not several; run the recipes one at a time with --method NAME",
        ),
        (
            ["--method", "finetune,nad", "--resume"],
            "--resume takes one recipe, not several; run the recipes one at a time with --method NAME",
        ),
        (
            ["--method", "act-edit", "--checkpoint-every", "1"],
            "act-edit cannot be checkpointed (its work is not a series of passes over the clean subset); "
            "drop --checkpoint-every, or use one of: ",
        ),
        (
            ["--method", "finetune", "--checkpoint-every", "0"],
            "--checkpoint-every 0 must be at least 1 (passes over the clean subset between checkpoints)",
        ),
        (
            ["--method", "finetune", "--resume"],
            "m.resume.safetensors: no checkpoint to resume from; run without --resume",
        ),
    ],
)
def test_checkpoint_options_refused_where_they_cannot_work(
    small: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    result = runner.invoke(
        app,
        [
            "unlearn",
            str(small["model"]),
            "--data",
            str(small["data"]),
            "--clean-frac",
            "1",
            "-o",
            str(tmp_path / "m.safetensors"),
            *extra,
        ],
    )
    assert result.exit_code == 2 and message in error_line(result) and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_foreign_or_stale_checkpoint(small: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    args = [
        "unlearn",
        str(small["model"]),
        "--data",
        str(small["data"]),
        "--clean-frac",
        "1",
        "--method",
        "finetune",
        "-o",
        str(out),
    ]
    (tmp_path / "m.resume.safetensors").write_bytes(
        (small["model"]).read_bytes()
    )  # a model, not an unlearning checkpoint
    foreign = runner.invoke(app, [*args, "--resume"])
    assert (
        foreign.exit_code == 2
        and "not an unlearning checkpoint written by cleanse unlearn --checkpoint-every" in error_line(foreign)
    )
    stale = runner.invoke(app, [*args, "--checkpoint-every", "1"])
    assert stale.exit_code == 2 and "pass --resume to continue it, or --force to start over" in error_line(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.resume.safetensors"]
