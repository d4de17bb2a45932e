"""Hardening, signals: interrupted work in real subprocesses (SIGINT, SIGTERM), checkpoint and resume, and two runs
from the same input at once.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from helpers import TRAIN_ARGS, cleanse_process, error_line, finish, png, tiny_model, wait_for
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.models import save_model

runner = CliRunner()


@pytest.mark.slow
def test_sigint_and_sigterm_during_train_leave_nothing(small: dict[str, Path], tmp_path: Path) -> None:
    signals = {
        "int": (signal.SIGINT, 130, "interrupted (SIGINT)"),
        "term": (signal.SIGTERM, 143, "terminated (SIGTERM)"),
    }
    runs = {}
    for key in signals:  # both at once: the start-up (importing torch) dominates
        (tmp_path / key).mkdir()
        runs[key] = cleanse_process(
            ["train", small["data"], "-o", tmp_path / key / "m.safetensors", "--epochs", "200", *TRAIN_ARGS],
            small["cache"],
        )
    for key, (sig, _, _) in signals.items():
        proc, lines = runs[key]
        wait_for(lambda: any("epoch 2/200" in line for line in lines), proc, lines)  # noqa: B023
        proc.send_signal(sig)
    for key, (_, code, name) in signals.items():
        rc, stderr = finish(*runs[key])
        assert rc == code, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"{name} during epoch ") and last.endswith("/200 of train cnn; no output was written"), (
            stderr
        )
        assert "Traceback" not in stderr
        assert list((tmp_path / key).iterdir()) == []  # no model, no run record, no temporary file


@pytest.mark.slow
def test_sigint_during_unlearn_leaves_nothing(small: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    proc, lines = cleanse_process(
        [
            "unlearn",
            small["model"],
            "--method",
            "finetune",
            "--epochs",
            "500",
            "--data",
            small["data"],
            "--clean-frac",
            "1",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "-o",
            out,
        ],
        small["cache"],
    )
    wait_for(
        lambda: any("unlearn finetune:" in line and "finetune" in line.split(":", 1)[1] for line in lines), proc, lines
    )
    proc.send_signal(signal.SIGINT)
    rc, stderr = finish(proc, lines)
    assert rc == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGINT) after epoch ") and last.endswith(
        "of unlearn finetune; no output was written"
    ), stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_checkpoint_and_resume_give_the_uninterrupted_result(small: dict[str, Path], tmp_path: Path) -> None:
    from cleanse.files import read_safetensors

    common = [small["data"], "--epochs", "6", "--seed", "3", *TRAIN_ARGS]
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    state = tmp_path / "resumed.resume.safetensors"
    reference, ref_lines = cleanse_process(["train", *common, "-o", straight], small["cache"])
    proc, lines = cleanse_process(["train", *common, "-o", resumed, "--checkpoint-every", "2"], small["cache"])
    wait_for(state.exists, proc, lines)
    proc.send_signal(signal.SIGINT)
    rc, stderr = finish(proc, lines)
    assert rc == 130, stderr
    assert "rerun the same command with --resume to continue" in stderr.strip().splitlines()[-1]
    assert state.is_file() and not resumed.exists() and not Path(f"{resumed}.run.json").exists()
    assert finish(reference, ref_lines)[0] == 0

    again = runner.invoke(app, ["train", *map(str, common), "-o", str(resumed), "--resume", "--epochs", "7"])
    assert again.exit_code == 2 and "was written with --epochs 6, this run has 7" in error_line(again)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' OMP_NUM_THREADS=1: the same arithmetic, without another start-up
    try:
        done = runner.invoke(app, ["train", *map(str, common), "-o", str(resumed), "--resume"])
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output
    assert "resuming from" in done.stderr and not state.exists()
    a, _ = read_safetensors(straight)
    b, _ = read_safetensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads(Path(f"{resumed}.run.json").read_text())
    assert len(record["history"]) == 6 and record["parameters"]["resumed_after_epoch"] in (2, 4)


def test_resume_refuses_what_does_not_fit(small: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    missing = runner.invoke(app, ["train", str(small["data"]), "-o", str(out), "--resume"])
    assert missing.exit_code == 2 and "no checkpoint to resume from" in error_line(missing)
    save_model(tiny_model(10), tmp_path / "m.resume.safetensors")
    foreign = runner.invoke(app, ["train", str(small["data"]), "-o", str(out), "--resume"])
    assert foreign.exit_code == 2 and "not a training checkpoint written by cleanse train" in error_line(foreign)
    stale = runner.invoke(app, ["train", str(small["data"]), "-o", str(out), "--checkpoint-every", "1"])
    assert stale.exit_code == 2 and "pass --resume to continue it, or --force to start over" in error_line(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.resume.safetensors"]


# --- two runs, same inputs, different outputs ------------------------------------------------------------------------


def test_parallel_runs_from_the_same_input_do_not_interfere(tmp_path: Path) -> None:
    data = tmp_path / "folder"
    for name in "abc":
        (data / name).mkdir(parents=True)
        for i in range(12):
            png(data / name / f"{i}.png", colour=(20 * i, 60, 90 + 40 * ord(name) % 100))
    cache = tmp_path / "shared-cache"  # both decode the folder and write the same cache entry
    runs = [
        cleanse_process(["poison", data, "--rate", "0.2", "--target", "1", "-o", tmp_path / f"p{i}.safetensors"], cache)
        for i in (1, 2)
    ]
    for proc, lines in runs:
        rc, stderr = finish(proc, lines)
        assert rc == 0, stderr
    for suffix in (".safetensors", ".trigger.safetensors"):
        assert (tmp_path / f"p1{suffix}").read_bytes() == (tmp_path / f"p2{suffix}").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert len(list(cache.glob("imagefolder-*.safetensors"))) == 1 and not list(cache.glob(".*"))
