"""Grad-CAM against a direct autograd computation of the formula; TAR by hand; explain end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from cleanse.attacks import Trigger
from cleanse.cli import app
from cleanse.engine.gradcam import cam_shift, grad_cam, summarise, tar_and_share
from cleanse.engine.layers import default_layer, probe_layers, resolve_layer, tar_layer
from cleanse.engine.tar import measure_tar
from cleanse.errors import CleanseError
from cleanse.models import ARCHITECTURES, new_model, save_model
from tests.conftest import synthetic


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.act(self.conv1(x)))).flatten(1))


def reference_cam(model: Tiny, x: torch.Tensor, cls: int) -> torch.Tensor:
    """The formula computed the long way, for one image: weights from autograd of the logit."""
    a = model.conv2(model.act(model.conv1(x)))
    a.retain_grad()
    logit = model.fc(model.pool(a).flatten(1))[0, cls]
    logit.backward()
    weights = a.grad[0].mean(dim=(1, 2))
    cam = torch.relu((weights.view(-1, 1, 1) * a[0]).sum(0))
    return torch.nn.functional.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[
        0, 0
    ].detach()


def test_grad_cam_matches_the_formula_batched_and_unbatched():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(5, 3, 12, 12)
    batched = grad_cam(model, x, "conv2")
    for i in range(5):
        ref = reference_cam(model, x[i : i + 1], int(batched.classes[i]))
        single = grad_cam(model, x[i : i + 1], "conv2").cams[0]
        assert torch.allclose(batched.cams[i], ref, atol=1e-5)
        assert torch.allclose(single, ref, atol=1e-5)
    forced = grad_cam(model, x, "conv2", torch.full((5,), 2))
    assert torch.allclose(forced.cams[0], reference_cam(model, x[:1], 2), atol=1e-5)


def test_grad_cam_leaves_no_hooks_and_no_parameter_gradients():
    model = Tiny().eval()
    for _ in range(3):
        grad_cam(model, torch.rand(2, 3, 12, 12), "conv2")
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(CleanseError, match="unknown layer 'nope'; valid layers include: conv1, act, conv2, pool, fc"):
        resolve_layer(model, "nope")
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES.names() + ["torchvision:resnet18"])
def test_default_and_tar_layers_exist_for_every_architecture(arch):
    model = new_model(arch, 10, arch_args={"width": "8,16,16"} if arch == "cnn" else {}).eval()
    layer = default_layer(model, (3, 32, 32))
    res = grad_cam(model, torch.rand(2, 3, 32, 32), layer)
    assert res.cams.shape == (2, 32, 32) and (res.cams >= 0).all()
    grids = {i.name: i.grid for i in probe_layers(model, (3, 32, 32))}
    assert grids[tar_layer(model, (3, 32, 32))][0] >= 4
    if arch == "cnn":
        assert layer == "layer3" and grids["layer3"] == (3, 3)
        assert tar_layer(model, (3, 32, 32)) == "layer2" and grids["layer2"] == (7, 7)


def test_tar_and_attention_share_by_hand():
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, 0] = True
    cams = torch.ones(3, 4, 4)
    cams[0, 0, 0] = 16.0  # inside 16, outside mean 1 -> TAR 16, share 16/31
    cams[2] = 0  # all-zero map: undefined
    tar, share = tar_and_share(cams, region)
    assert tar[0].item() == pytest.approx(16.0) and share[0].item() == pytest.approx(16 / 31)
    assert tar[1].item() == pytest.approx(1.0) and share[1].item() == pytest.approx(1 / 16)
    assert torch.isnan(tar[2]) and torch.isnan(share[2])
    assert summarise(tar) == {"mean": pytest.approx(8.5), "median": pytest.approx(1.0), "count": 2, "nulls": 1}
    big = torch.ones(4, 4, dtype=torch.bool)
    assert torch.isnan(tar_and_share(cams, big)[0]).all()  # region over half the image
    assert torch.isnan(tar_and_share(cams, torch.zeros(4, 4, dtype=torch.bool))[0]).all()
    assert cam_shift(cams[:2], cams[:2]).abs().max() < 1e-6


def test_tar_computes_in_float64_where_the_device_has_it_and_float32_on_mps(monkeypatch):
    from cleanse.engine import gradcam
    from cleanse.engine.device import wide_float

    assert wide_float(torch.device("cpu")) == torch.float64 and wide_float(torch.device("cuda", 0)) == torch.float64
    assert wide_float(torch.device("mps")) == torch.float32  # MPS has no float64
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:2, :2] = True
    cams = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(0))
    wide, wide_shift = tar_and_share(cams, region), cam_shift(cams, cams.flip(0))
    monkeypatch.setattr(gradcam, "wide_float", lambda device: torch.float32)  # the MPS path, on the CPU
    narrow, narrow_shift = tar_and_share(cams, region), cam_shift(cams, cams.flip(0))
    assert torch.allclose(wide[0], narrow[0], rtol=1e-5) and torch.allclose(wide[1], narrow[1], rtol=1e-5)
    assert torch.allclose(wide_shift, narrow_shift, atol=1e-6) and wide_shift.max() > 0.05


@pytest.mark.slow
def test_backdoored_model_attends_to_the_trigger_far_more_than_a_clean_model(
    badnets_setup, clean_model, record_property
):
    model, trigger, _ = badnets_setup
    test = synthetic("test")
    layer = tar_layer(model, (3, 32, 32))
    bad = measure_tar(model, test.images, test.labels, trigger, layer)
    good = measure_tar(clean_model, test.images, test.labels, trigger, layer)
    record_property("tar_backdoored", bad["tar"])
    record_property("tar_clean", good["tar"])
    print(
        f"set TAR on triggered images: backdoored {bad['tar']:.2f} (median {bad['tar_median']:.2f}), "
        f"clean {good['tar']:.2f}"
    )
    assert layer == "layer2" and bad["n"] == 900
    assert bad["tar"] > 8.0 and bad["tar"] > 5 * good["tar"]
    assert bad["tar_median"] > 20 * good["tar_median"]  # the clean model's mean is carried by a few outliers
    assert bad["attention_share"] > 5 * good["attention_share"]


runner = CliRunner()


@pytest.fixture(scope="module")
def saved_backdoored(badnets_setup, tmp_path_factory):
    model, trigger, _ = badnets_setup
    folder = tmp_path_factory.mktemp("explain")
    save_model(model, folder / "m.safetensors")
    trigger.save(folder / "t.safetensors")
    return folder


@pytest.mark.slow
def test_explain_writes_pngs_sheet_and_json(saved_backdoored, tmp_path):
    out = tmp_path / "heat"
    result = runner.invoke(
        app,
        [
            "explain",
            str(saved_backdoored / "m.safetensors"),
            "--data",
            "synthetic:test",
            "--trigger",
            str(saved_backdoored / "t.safetensors"),
            "--n",
            "6",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "explain.json").read_text())
    assert len(doc["images"]) == 6 and doc["layer"] == "layer3" and doc["tar_layer"] == "layer2"
    assert all(e["label"] != 0 and e["triggered"]["tar"] is not None for e in doc["images"])
    assert doc["set"]["tar"] > 1 and doc["set"]["tar_median"] is not None and doc["set"]["clean_tar"] is not None
    names = {p.name for p in out.iterdir()}
    assert {"sheet.png", "explain.json", "run.json", "img-000.png", "img-005-triggered.png"} <= names
    with Image.open(out / "sheet.png") as sheet:
        assert sheet.size[1] > sheet.size[0] / 2  # six rows of six panels (and a label margin)
    assert json.loads((out / "run.json").read_text())["command"] == "explain"


def test_explain_image_files_are_resized_with_a_note(untrained_files, tmp_path):
    Image.fromarray(np.full((48, 40, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    result = runner.invoke(
        app, ["explain", str(untrained_files / "bd.safetensors"), str(tmp_path / "a.png"), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "48x40 resized to 32x32" in result.stderr
    assert (tmp_path / "o" / "img-000.png").is_file()


def test_explain_pictures_carry_their_labels(untrained_files, tmp_path):
    """sheet.png and img-NNN.png have a title, column headings and (the sheet) row labels around the bare grid."""
    mask = torch.zeros(32, 32)
    mask[-4:, -4:] = 1
    Trigger("blend", {"mask": mask, "pattern": torch.ones(3, 32, 32)}, 0, (3, 32, 32)).save(tmp_path / "t.safetensors")
    out = tmp_path / "o"
    result = runner.invoke(
        app,
        [
            "explain",
            str(untrained_files / "bd.safetensors"),
            "--data",
            "synthetic:test",
            "--trigger",
            str(tmp_path / "t.safetensors"),
            "--n",
            "2",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    cell = 32 * 4 + 2  # a 32x32 image at scale 4 and its gap
    with Image.open(out / "sheet.png") as sheet:
        width, height = sheet.size
    assert width > 6 * cell + 2 and height > 2 * cell + 2  # a row-label margin; title and heading bands
    with Image.open(out / "img-000-triggered.png") as one:
        width, height = one.size
    assert width == 3 * (32 * 6 + 2) + 2 and height > 32 * 6 + 4  # headed and titled, no margin


def _usage(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1


def test_explain_bad_inputs(untrained_files, tmp_path):
    model = str(untrained_files / "bd.safetensors")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _usage(
        runner.invoke(app, ["explain", model, str(tmp_path / "bad.png"), "-o", str(tmp_path / "o1")]),
        "cannot decode this image",
    )
    big = Trigger("blend", {"mask": torch.zeros(64, 64), "pattern": torch.zeros(3, 64, 64)}, 0, (3, 64, 64))
    big.save(tmp_path / "big.safetensors")
    _usage(
        runner.invoke(
            app,
            [
                "explain",
                model,
                "--data",
                "synthetic:test",
                "--trigger",
                str(tmp_path / "big.safetensors"),
                "-o",
                str(tmp_path / "o2"),
            ],
        ),
        "trigger was made for 3x64x64 images but the model's inputs are 3x32x32",
    )
    _usage(
        runner.invoke(app, ["explain", model, "--data", "synthetic:test", "--n", "5000", "-o", str(tmp_path / "o3")]),
        "--n 5000 is larger than the 1000 images",
    )
    _usage(
        runner.invoke(
            app, ["explain", model, "--data", "synthetic:test", "--layer", "nope", "-o", str(tmp_path / "o4")]
        ),
        "unknown layer 'nope'",
    )
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
