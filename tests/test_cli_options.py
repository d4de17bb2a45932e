"""The common and model-loading flags are declared once and reach every command as one object."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import cleanse.cli.demo
import cleanse.cli.explain
import cleanse.cli.poison
import cleanse.cli.report
import cleanse.cli.scan
import cleanse.cli.train
import cleanse.cli.unlearn
from cleanse.cli import app
from cleanse.errors import CleanseError
from cleanse.jobs import RunSettings
from cleanse.models import ModelOptions

COMMON = ["--device", "cpu", "--seed", "7", "--force", "--quiet", "--debug", "--json"]
MODEL = [
    "--arch",
    "cnn",
    "--arch-arg",
    "width=8,16,16",
    "--num-classes",
    "3",
    "--input-size",
    "3,16,16",
    "--mean",
    "0.5,0.5,0.5",
    "--std",
    "0.25,0.25,0.25",
    "--classes",
    "a,b,c",
    "--preprocess",
    "center-crop",
]
EXPECTED_MODEL = ModelOptions(
    arch="cnn",
    num_classes=3,
    input_size=(3, 16, 16),
    mean=[0.5] * 3,
    std=[0.25] * 3,
    classes=["a", "b", "c"],
    arch_args={"width": "8,16,16"},
    preprocess="center-crop",
)
# command -> (module whose job is called, job name, the command's own required arguments, takes model flags)
COMMANDS: dict[str, tuple[Any, str, list[str], bool]] = {
    "poison": (cleanse.cli.poison, "poison", ["synthetic", "-o", "p.safetensors"], False),
    "train": (cleanse.cli.train, "train", ["synthetic", "-o", "m.safetensors"], True),
    "scan": (cleanse.cli.scan, "scan", ["m.safetensors", "--data", "synthetic:test"], True),
    "unlearn": (cleanse.cli.unlearn, "unlearn", ["m.safetensors", "--data", "synthetic"], True),
    "explain": (cleanse.cli.explain, "explain", ["m.safetensors", "--data", "synthetic:test"], True),
    "report": (cleanse.cli.report, "report", ["runs/"], True),
    "demo": (cleanse.cli.demo, "demo", [], False),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_hands_the_shared_flags_to_its_job(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, job, args, takes_model = COMMANDS[name]
    seen: dict[str, Any] = {}

    def captured(options: Any, settings: RunSettings, progress: Any) -> None:
        seen.update(options=options, settings=settings)
        raise CleanseError("captured")

    monkeypatch.setattr(module, job, captured)
    result = CliRunner().invoke(app, [name, *args, *COMMON, *(MODEL if takes_model else [])])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == "error: captured"
    assert seen["settings"] == RunSettings(device="cpu", seed=7, force=True)
    if takes_model:
        assert seen["options"].model == EXPECTED_MODEL


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_documented_flag(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flags = ["--device", "--seed", "--force", "--quiet", "--debug", "--json"]
    if COMMANDS[name][3]:
        flags += ["--arch", "--arch-arg", "--num-classes", "--input-size", "--preset", "--mean", "--std", "--classes"]
        flags += ["--preprocess"]
    for flag in flags:
        assert flag in result.output, f"{name} --help lacks {flag}"


def test_a_bad_model_flag_is_exit_2_before_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cleanse.cli.scan, "scan", lambda *a: pytest.fail("the job ran"))
    result = CliRunner().invoke(
        app, ["scan", "m.safetensors", "--data", "synthetic:test", "--mean", "0.5,x", "--std", "1,1"]
    )
    assert result.exit_code == 2
    assert "error: --mean '0.5,x' must be comma-separated numbers" in result.output


def test_an_unknown_preprocessing_is_exit_2_before_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cleanse.cli.train, "train", lambda *a: pytest.fail("the job ran"))
    result = CliRunner().invoke(app, ["train", "synthetic", "-o", "m.safetensors", "--preprocess", "crop"])
    assert result.exit_code == 2
    assert "error: --preprocess 'crop' is unknown; choose one of resize, center-crop" in result.output
