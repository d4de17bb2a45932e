"""`timm:NAME`, and the input size reaching builders whose size is fixed at construction (ViTs): registry `vit`,
`torchvision:vit_*`, timm ViTs. The size arguments are derived at every build, never stored in a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.data import make_synthetic, save_dataset
from cleanse.errors import CleanseError
from cleanse.models import ModelOptions, load_model, new_model, save_model
from cleanse.models.build import TIMM_MISSING, size_args
from tests.helpers import error_line
from tests.tiny_archs import VIT_ARGS, VIT_CLI

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "50", "--precision", "fp32", "--device", "cpu"]
TIMM_VIT = "timm:vit_tiny_patch16_224"
TIMM_VIT_ARGS = {"depth": 2, "patch_size": 8}


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, message: str) -> None:
    """Exit 2, one error line equal to 'error: ' + message, no traceback."""
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"error: {message}" and "Traceback" not in result.output


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["cleanse"])


def small_data(folder: Path, size: int, n: int = 200) -> Path:
    path = folder / f"synthetic-{size}.safetensors"
    save_dataset(make_synthetic("train", n=n, size=size), path)
    return path


# --- size arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, args, size, filled",
    [
        ("vit", {}, (3, 32, 32), {"image_size": 32}),
        ("vit", {}, (3, 48, 48), {"image_size": 48}),
        ("vit", {"image_size": 48}, (3, 48, 48), {}),
        ("vit", {}, None, {}),
        ("torchvision:vit_b_16", {}, (3, 32, 32), {"image_size": 32}),
        ("torchvision:vit_b_16", {"image_size": 32}, (3, 32, 32), {}),
        ("torchvision:resnet18", {}, (3, 40, 56), {}),
        ("torchvision:swin_t", {}, (3, 40, 56), {}),
        ("cnn", {}, (3, 48, 48), {}),
        (f"{Path(__file__).with_name('tiny_archs.py')}:tiny_swin", {}, (3, 48, 48), {}),
    ],
)
def test_size_args(arch, args, size, filled):
    assert size_args(arch, args, size) == filled


@pytest.mark.parametrize(
    "arch, args, size, message",
    [
        (
            "vit",
            {},
            (3, 48, 32),
            "vit takes only square inputs (image_size is one side) but the input size is 48x32; "
            "use square images (or --input-size C,S,S for a raw state dict)",
        ),
        (
            "torchvision:vit_b_16",
            {"image_size": 224},
            (3, 32, 32),
            "--arch-arg image_size=224 disagrees with the input size 32x32 (torchvision:vit_b_16 accepts only "
            "image_size x image_size inputs); drop --arch-arg image_size: cleanse sets it from the input size",
        ),
    ],
)
def test_size_args_refusals(arch, args, size, message):
    with pytest.raises(CleanseError) as caught:
        size_args(arch, args, size)
    assert caught.value.message == message


def test_torchvision_vit_b_16_builds_for_32x32_inputs():
    model = new_model("torchvision:vit_b_16", 10, input_size=(3, 32, 32)).eval()
    assert model.net.image_size == 32 and model.spec.arch_args == {}  # derived, not stored
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_a_raw_vit_state_dict_loads_at_its_input_size_and_the_wrong_size_is_named(tmp_path):
    model = new_model("vit", 10, input_size=(3, 48, 48), arch_args=VIT_ARGS, seed=0).eval()
    assert model.net.image_size == 48 and model.spec.arch_args == VIT_ARGS
    save_file(model.net.state_dict(), tmp_path / "raw.safetensors")
    options = dict(arch="vit", num_classes=10, arch_args=VIT_ARGS, mean=model.spec.mean, std=model.spec.std)
    loaded = load_model(tmp_path / "raw.safetensors", ModelOptions(input_size=(3, 48, 48), **options))
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    with pytest.raises(CleanseError) as caught:
        load_model(tmp_path / "raw.safetensors", ModelOptions(**options))  # assumes 3,32,32
    assert caught.value.message.endswith(
        "; or the wrong input size: built for 3,32,32 (image_size=32); give the weights' size with --input-size C,H,W"
    )
    assert "encoder.pos_embedding (1, 145, 32) vs (1, 65, 32)" in caught.value.message


def test_non_square_data_for_a_torchvision_vit_is_refused_before_work(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 48, 3), dtype=np.uint8)
    np.savez(tmp_path / "wide.npz", x=x, y=np.arange(20) % 10)
    out = tmp_path / "m.safetensors"
    refused(
        run("train", tmp_path / "wide.npz", "--arch", "torchvision:vit_b_16", "-o", out, *FAST),
        "torchvision:vit_b_16 takes only square inputs (image_size is one side) but the input size is 32x48; "
        "use square images (or --input-size C,S,S for a raw state dict)",
    )
    refused(
        run("train", tmp_path / "wide.npz", "--arch", "vit", "--arch-arg", "image_size=32", "-o", out, *FAST),
        "vit takes only square inputs (image_size is one side) but the input size is 32x48; "
        "use square images (or --input-size C,S,S for a raw state dict)",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.npz"]


@pytest.mark.slow
@pytest.mark.parametrize("side", [32, 48])
def test_a_vit_trained_at_its_data_size_round_trips(tmp_path, side):
    data = small_data(tmp_path, side)
    model = tmp_path / "vit.safetensors"
    result = run("train", data, "--arch", "vit", *VIT_CLI, "-o", model, *FAST)
    assert result.exit_code == 0, result.output
    doc = metadata(model)
    assert doc["arch"]["args"] == VIT_ARGS and doc["input_size"] == [3, side, side]  # no image_size stored
    loaded = load_model(model)
    tokens = (side // 4) ** 2 + 1
    assert loaded.net.image_size == side and loaded.net.encoder.pos_embedding.shape == (1, tokens, 32)

    out = tmp_path / "explain"
    result = run("explain", model, "--data", "synthetic:test", "--n", "2", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "explain.json").read_text())["images"]) == 2
    assert (f"resized to {side}x{side} to fit the model" in result.stderr) == (side != 32)

    result = run("train", data, "--arch", "vit", "--arch-arg", "image_size=32", *VIT_CLI, "-o", tmp_path / "x", *FAST)
    if side == 32:
        assert result.exit_code == 0, result.output
    else:
        refused(
            result,
            f"--arch-arg image_size=32 disagrees with the input size {side}x{side} (vit accepts only "
            "image_size x image_size inputs); drop --arch-arg image_size: cleanse sets it from the input size",
        )


# --- timm ------------------------------------------------------------------------------------------------------------


def test_timm_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    out = tmp_path / "m.safetensors"
    refused(run("train", "synthetic", "--arch", "timm:resnet18", "-o", out, *FAST), TIMM_MISSING)
    assert TIMM_MISSING == "--arch timm:NAME needs the timm package; install it with pip install 'cleanse[timm]'"
    assert list(tmp_path.iterdir()) == []


def test_timm_cnn_and_vit_build_for_the_input_size_through_the_wrapper():
    pytest.importorskip("timm")
    assert size_args("timm:resnet18", {}, (3, 32, 32)) == {}  # a CNN takes any size
    assert size_args("timm:resnet18", {}, (1, 32, 32)) == {"in_chans": 1}
    assert size_args(TIMM_VIT, {}, (3, 32, 48)) == {"img_size": (32, 48)}
    assert size_args(TIMM_VIT, {"img_size": 64}, (3, 32, 32)) == {}  # explicit wins
    assert size_args("timm:swin_tiny_patch4_window7_224", {}, (3, 64, 64)) == {"img_size": 64}

    gray = new_model("timm:resnet18", 3, input_size=(1, 32, 32), mean=[0.5], std=[0.25]).eval()
    assert gray.spec.arch_args == {}
    with torch.no_grad():
        assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    vit = new_model(TIMM_VIT, 10, input_size=(3, 32, 48), arch_args=TIMM_VIT_ARGS, seed=0).eval()
    assert vit.net.patch_embed.img_size == (32, 48) and vit.spec.arch_args == TIMM_VIT_ARGS
    with torch.no_grad():
        logits = vit(torch.rand(2, 3, 32, 48))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)


@pytest.mark.parametrize(
    "arch, args, message",
    [
        (
            "timm:resnet18.a1_in1k",
            [],
            "--arch timm:resnet18.a1_in1k: '.a1_in1k' names pretrained weights, which cleanse never loads; "
            "pass --arch timm:resnet18",
        ),
        (TIMM_VIT, ["--arch-arg", "foo=1"], f"{TIMM_VIT} does not take --arch-arg 'foo'; check --arch-arg"),
        (
            TIMM_VIT,
            ["--arch-arg", "embed_dim=30", "--arch-arg", "num_heads=4"],
            f"{TIMM_VIT} failed to build with --arch-arg {{'embed_dim': 30, 'num_heads': 4}} "
            "(AssertionError: dim should be divisible by num_heads); check --arch-arg",
        ),
        *[
            (
                TIMM_VIT,
                ["--arch-arg", f"{name}=x"],
                f"--arch-arg {name}=... is refused: cleanse never downloads or loads weights through the "
                "architecture builder; the weights come from MODEL",
            )
            for name in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
        ],
    ],
)
def test_timm_refusals(tmp_path, arch, args, message):
    pytest.importorskip("timm")
    out = tmp_path / "m.safetensors"
    refused(run("train", "synthetic", "--arch", arch, *args, "-o", out, *FAST), message)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_timm_model_lists_close_matches(tmp_path):
    pytest.importorskip("timm")
    result = run("train", "synthetic", "--arch", "timm:vit_tiny_patch16", "-o", tmp_path / "m.safetensors", *FAST)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert line.startswith("error: unknown timm model 'vit_tiny_patch16'; close matches: timm:vit_tiny_patch16_")
    assert "timm:vit_tiny_patch16_224" in line and line.endswith("(timm.list_models() lists them all)")
    with pytest.raises(CleanseError, match=r"^unknown timm model 'zzzz'; e\.g\. timm:resnet18 "):
        size_args("timm:zzzz", {}, (3, 32, 32))


def test_timm_metadata_cannot_ask_for_a_checkpoint(tmp_path):
    pytest.importorskip("timm")
    model = new_model("timm:resnet18", 2, input_size=(3, 32, 32))
    save_model(model, tmp_path / "m.safetensors")
    doc = metadata(tmp_path / "m.safetensors")
    assert doc["arch"] == {"name": "timm:resnet18", "args": {}}
    doc["arch"]["args"] = {"checkpoint_path": "/etc/passwd"}
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, tmp_path / "crafted.safetensors", metadata={"cleanse": json.dumps(doc)})
    with pytest.raises(CleanseError, match=r"^--arch-arg checkpoint_path=\.\.\. is refused"):
        load_model(tmp_path / "crafted.safetensors")


@pytest.mark.slow
def test_a_timm_vit_trains_at_32x32_round_trips_and_explains(tmp_path):
    pytest.importorskip("timm")
    data = small_data(tmp_path, 32)
    model = tmp_path / "timm-vit.safetensors"
    args = [a for k, v in TIMM_VIT_ARGS.items() for a in ("--arch-arg", f"{k}={v}")]
    result = run("train", data, "--arch", TIMM_VIT, *args, "-o", model, *FAST)
    assert result.exit_code == 0, result.output
    assert metadata(model)["arch"] == {"name": TIMM_VIT, "args": TIMM_VIT_ARGS}  # img_size is derived, not stored
    loaded = load_model(model)
    assert loaded.net.patch_embed.img_size == (32, 32) and loaded.net.pos_embed.shape == (1, 17, 192)
    out = tmp_path / "explain"
    result = run("explain", model, "--data", "synthetic:test", "--n", "2", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "explain.json").read_text())["images"]) == 2
