"""Every command on a tiny Vision Transformer (2 blocks, width 32, patch 4 on 32x32: an 8x8 token grid), and
--layer refused before any work with exit 2 where it once crashed with exit 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.models import new_model, save_model
from tests import tiny_archs

runner = CliRunner()
LAST_LN = "encoder.layers.encoder_layer_1.ln_1"
TAR_BLOCK = "encoder.layers.encoder_layer_0"
DEV = ["--device", "cpu"]
FAST = [*DEV, "--precision", "fp32"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def usage_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def untrained_vit(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = new_model("vit", 10, arch_args=tiny_archs.VIT_ARGS)
    torch.nn.init.normal_(model.net.heads.head.weight, std=0.5)
    path = tmp_path_factory.mktemp("vit") / "vit.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def badnets_trigger(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("poison") / "p.safetensors"
    result = run("poison", "synthetic", "--attack", "badnets", "--target", "0", "--rate", "0.1", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("nope", "unknown layer 'nope'; layers Grad-CAM can use (deepest last): "),
        ("heads.head", "layer 'heads.head' does not output a feature map on the image grid"),
        ("encoder.layers.encoder_layer_1", "has no gradient from the prediction at any grid cell"),
        (f"{LAST_LN}@9x9", "does not output a feature map on a 9x9 grid"),
    ],
)
@pytest.mark.parametrize("command", ["explain", "scan", "unlearn"])
def test_a_bad_layer_exits_2_before_any_work(untrained_vit, badnets_trigger, tmp_path, command, layer, message):
    out = tmp_path / "out"
    trigger = badnets_trigger.with_name("p.trigger.safetensors")
    extra = {
        "explain": ["--data", "synthetic:test", "--n", "2"],
        "scan": ["--data", "synthetic:test", "--detectors", "patch"],
        "unlearn": ["--data", "synthetic:test", "--method", "finetune", "--trigger", trigger],
    }[command]
    flags = DEV if command == "explain" else FAST
    usage_error(run(command, untrained_vit, *extra, "--layer", layer, "-o", out, *flags), message)
    assert not out.exists()


def test_explain_on_a_vit_uses_the_token_grid(untrained_vit, badnets_trigger, tmp_path):
    out = tmp_path / "x"
    trigger = badnets_trigger.with_name("p.trigger.safetensors")
    result = run("explain", untrained_vit, "--data", "synthetic:test", "--trigger", trigger, "--n", "3", "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "explain.json").read_text())
    assert doc["layer"] == doc["tar_layer"] == TAR_BLOCK
    assert (out / "sheet.png").is_file() and (out / "img-000-triggered.png").is_file()
    given = run(
        "explain",
        untrained_vit,
        "--data",
        "synthetic:test",
        "--n",
        "2",
        "--layer",
        f"{TAR_BLOCK}@8x8",
        "-o",
        tmp_path / "y",
    )
    assert given.exit_code == 0, given.output
    assert json.loads((tmp_path / "y" / "explain.json").read_text())["layer"] == f"{TAR_BLOCK}@8x8"


def test_a_recipe_without_grad_cam_runs_on_a_model_without_a_map(tmp_path):
    """An MLP has no feature map: unlearn ulrl/finetune need none, TAR is null with a note; explain refuses."""
    mlp = tmp_path / "mlp.py"
    mlp.write_text(
        "from torch import nn\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, num_classes))\n"
    )
    model = new_model(f"{mlp}:build", 10)
    save_model(model, tmp_path / "mlp.safetensors")
    args = ["--arch", f"{mlp}:build", *DEV]
    poisoned = tmp_path / "p.safetensors"
    assert run("poison", "synthetic", "--attack", "badnets", "--target", "0", "-o", poisoned, "-q").exit_code == 0
    trigger = tmp_path / "p.trigger.safetensors"
    result = run(
        "unlearn",
        tmp_path / "mlp.safetensors",
        "--data",
        "synthetic:test",
        "--method",
        "finetune",
        "--trigger",
        trigger,
        "--clean-frac",
        "0.05",
        "-o",
        tmp_path / "u",
        "--json",
        *args,
    )
    assert result.exit_code in (0, 1), result.output
    assert "TAR is not measured: the model has no feature map Grad-CAM can use" in result.stderr
    usage_error(
        run("explain", tmp_path / "mlp.safetensors", "--data", "synthetic:test", "-o", tmp_path / "e", *args),
        "has no feature map Grad-CAM can explain",
    )


@pytest.mark.slow
def test_every_command_on_a_trained_vit(badnets_trigger, tmp_path):
    trigger = badnets_trigger.with_name("p.trigger.safetensors")
    model = tmp_path / "vit.safetensors"
    trained = run(
        "train",
        badnets_trigger,
        "--arch",
        "vit",
        *tiny_archs.VIT_CLI,
        "--epochs",
        "3",
        "--test",
        "synthetic:test",
        "--trigger",
        trigger,
        "-o",
        model,
        "--json",
        *FAST,
    )
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["epochs"] == 3 and 0 <= summary["clean_accuracy"] <= 1, summary

    scanned = run(
        "scan",
        model,
        "--data",
        "synthetic:test",
        "--detectors",
        "patch,warp",
        "--steps",
        "20",
        "--n-clean",
        "200",
        "-o",
        tmp_path / "scan",
        "--json",
        *FAST,
    )
    assert scanned.exit_code in (0, 1), scanned.output
    doc = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert doc["tar_layer"] == TAR_BLOCK and doc["detectors_run"] == ["patch", "warp"]

    explained = run(
        "explain", model, "--data", "synthetic:test", "--trigger", trigger, "--n", "4", "-o", tmp_path / "x", *DEV
    )
    assert explained.exit_code == 0, explained.output

    cleaned = tmp_path / "clean.safetensors"
    unlearned = run(
        "unlearn",
        model,
        "--data",
        "synthetic:test",
        "--method",
        "tar-ewc",
        "--trigger",
        trigger,
        "--clean-frac",
        "0.2",
        "-o",
        cleaned,
        "--json",
        *FAST,
    )
    assert unlearned.exit_code in (0, 1), unlearned.output
    record = json.loads(Path(f"{cleaned}.run.json").read_text())
    assert record["before"]["tar"] is not None and record["after"]["tar"] is not None

    reported = run("report", tmp_path, "-o", tmp_path / "report")
    assert reported.exit_code == 0, reported.output
    assert (tmp_path / "report" / "report.html").is_file()
