"""End-to-end CLI tests through typer's CliRunner: poison, train, demo, bad input, exit codes."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cleanse.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_usage_error(result, message: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def poisoned_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("poison") / "p.safetensors"
    result = run(
        "poison",
        "synthetic",
        "--attack",
        "badnets",
        "--target",
        "0",
        "--rate",
        "0.1",
        "--seed",
        "1",
        "-o",
        out,
        "--preview",
        out.with_name("grid.png"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_poison_writes_dataset_trigger_record_and_preview(poisoned_file):
    out, summary = poisoned_file
    assert summary["poisoned"] == 500 and summary["rows"] == 5000 and summary["target"] == 0
    assert out.is_file() and out.with_name("p.trigger.safetensors").is_file() and out.with_name("grid.png").is_file()
    with Image.open(out.with_name("grid.png")) as grid:  # 8 columns x 2 rows of 32x32 images at scale 4, labelled
        assert grid.size[0] > 8 * 130 + 2 and grid.size[1] > 2 * 130 + 2
    record = json.loads(out.with_name("p.safetensors.run.json").read_text())
    assert record["cleanse_run"] == 1 and record["command"] == "poison" and record["counts"]["poisoned"] == 500


def test_poison_is_byte_identical_for_the_same_seed(poisoned_file, tmp_path):
    out, _ = poisoned_file
    again = tmp_path / "again.safetensors"
    assert run("poison", "synthetic", "--target", "0", "--rate", "0.1", "--seed", "1", "-o", again, "-q").exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    assert (
        again.with_name("again.trigger.safetensors").read_bytes() == out.with_name("p.trigger.safetensors").read_bytes()
    )


def test_poison_refuses_to_overwrite_without_force(poisoned_file):
    out, _ = poisoned_file
    before = out.read_bytes()
    assert_usage_error(run("poison", "synthetic", "-o", out), "output exists; pass --force")
    assert out.read_bytes() == before


def test_poison_bad_rate_leaves_nothing_behind(tmp_path):
    out = tmp_path / "x.safetensors"
    assert_usage_error(
        run("poison", "synthetic", "--attack", "sig", "--rate", "0.5", "-o", out), "lower --rate to at most 0.1000"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_with_test_and_trigger_prints_json_and_writes_record(poisoned_file, tmp_path):
    data, _ = poisoned_file
    out = tmp_path / "m.safetensors"
    result = run(
        "train",
        data,
        "--arch",
        "cnn",
        "--arch-arg",
        "width=16,32,32",
        "--epochs",
        "2",
        "--test",
        "synthetic:test",
        "--trigger",
        data.with_name("p.trigger.safetensors"),
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
        assert 0 <= summary[key] <= 1
    assert "train cnn: epoch 2/2" in result.stderr  # plain lines when not a terminal
    record = json.loads(out.with_name("m.safetensors.run.json").read_text())
    assert record["command"] == "train" and len(record["history"]) == 2
    assert record["inputs"]["data"]["sha256"] and record["metrics"] == {k: summary[k] for k in record["metrics"]}

    # continuing from those weights; a model/data class-count mismatch is refused
    more = tmp_path / "more.safetensors"
    assert run("train", "synthetic", "--init", out, "--epochs", "1", "-o", more, "-q").exit_code == 0
    import numpy as np

    np.savez(tmp_path / "three.npz", x=np.zeros((6, 32, 32, 3), dtype=np.uint8), y=np.array([0, 1, 2, 0, 1, 2]))
    assert_usage_error(
        run("train", tmp_path / "three.npz", "--init", out, "-o", tmp_path / "bad.safetensors"),
        "has 3 classes but the model has 10",
    )
    assert not (tmp_path / "bad.safetensors").exists()


def test_train_rejects_damaged_and_foreign_model_files(tmp_path):
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert_usage_error(
        run("train", "synthetic", "--init", tmp_path / "trunc.safetensors", "-o", tmp_path / "o.safetensors"),
        "file is truncated",
    )
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "raw.safetensors")
    assert_usage_error(
        run("train", "synthetic", "--init", tmp_path / "raw.safetensors", "-o", tmp_path / "o.safetensors"),
        "add --arch and --num-classes",
    )
    save_file(
        {"w": torch.zeros(2)}, tmp_path / "badmeta.safetensors", metadata={"cleanse": '{"format": "cleanse.model"}'}
    )
    assert_usage_error(
        run("train", "synthetic", "--init", tmp_path / "badmeta.safetensors", "-o", tmp_path / "o.safetensors"),
        "checkpoint format version None is not supported",
    )
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.slow
def test_demo_quick_runs_the_main_job(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--quick", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["before"]["clean_accuracy"] > 0.5 and summary["before"]["attack_success_rate"] > 0.5
    assert summary["after"]["attack_success_rate"] < summary["before"]["attack_success_rate"]
    assert {p.name for p in out.iterdir()} == {
        "poisoned.safetensors",
        "poisoned.trigger.safetensors",
        "model.safetensors",
        "model.safetensors.run.json",
        "scan",
        "model.tar-ewc.safetensors",
        "model.tar-ewc.safetensors.run.json",
        "explain-before",
        "explain-after",
        "report",
    }
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["summary"][0]["method"] == "tar-ewc" and "gradcam-tar-ewc" in report["images"]
    assert summary["report"] == str(out / "report" / "report.html") and (out / "report" / "report.html").is_file()
    assert run("demo", "--quick", "-o", out).exit_code == 2  # not empty, no --force


@pytest.mark.parametrize(
    "command, message",
    [
        ("scan", "model.safetensors: no such model file; check the path"),
        ("report", "model.safetensors: no such file or folder; pass run records"),
    ],
)
def test_scan_and_report_on_a_missing_file_exit_2(command, message):
    assert_usage_error(run(command, "model.safetensors", "--data", "synthetic"), message)


def test_help_lists_the_six_subcommands():
    result = run("--help")
    assert result.exit_code == 0
    for name in ("poison", "train", "scan", "unlearn", "explain", "report"):
        assert name in result.output


def test_usage_errors_exit_2_and_unknown_attack_lists_choices(tmp_path):
    assert run("train").exit_code == 2
    assert_usage_error(
        run("poison", "synthetic", "--attack", "nope", "-o", tmp_path / "x.safetensors"),
        "unknown attack 'nope'; choose one of: badnets, blended, sig, wanet",
    )
    assert_usage_error(
        run("poison", "synthetic", "-o", tmp_path / "missing" / "x.safetensors"), "output folder does not exist"
    )
    assert_usage_error(
        run("train", "synthetic", "--device", "cuda:7", "-o", tmp_path / "x.safetensors"), "--device cuda:7"
    )
