"""Round trips of model, dataset and trigger files; damaged and crafted files; the architecture registry."""

from __future__ import annotations

import json
import pickle
import struct
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from cleanse.data import load_dataset_file, save_dataset
from cleanse.errors import CleanseError
from cleanse.files import read_safetensors
from cleanse.models import ARCHITECTURES, ModelOptions, load_model, new_model, save_model
from tests.conftest import synthetic


def small_model(num_classes: int = 10, arch: str = "cnn", **args):
    torch.manual_seed(0)
    args = args or ({"width": "8,16,16"} if arch == "cnn" else {})
    return new_model(arch, num_classes, None, (3, 32, 32), [0.5] * 3, [0.25] * 3, args).eval()


def test_model_round_trip_gives_identical_predictions(tmp_path):
    model = small_model()
    with torch.no_grad():  # make BN statistics non-trivial
        model.net.layer1.norm1.running_mean.uniform_()
    save_model(model, tmp_path / "m.safetensors", {"command": "test"})
    back = load_model(tmp_path / "m.safetensors")
    for key, value in model.net.state_dict().items():
        assert torch.equal(back.net.state_dict()[key], value)
    x = torch.rand(4, 3, 32, 32)
    model = model.to(memory_format=torch.channels_last)  # loaded models come back in channels_last
    assert torch.equal(model(x), back(x))
    assert back.spec.arch == "cnn" and back.spec.arch_args == {"width": "8,16,16"} and back.spec.mean == [0.5] * 3
    assert back.spec.provenance == {"command": "test"}
    _, metadata = read_safetensors(tmp_path / "m.safetensors")
    assert not any(k.startswith("net.") for k in back.net.state_dict())  # bare architecture keys on disk
    assert json.loads(metadata["cleanse"])["format"] == "cleanse.model"


def test_dataset_round_trip(tmp_path):
    from cleanse.attacks import poison_dataset

    data = synthetic("test")
    poisoned, _ = poison_dataset(data, "wanet", 3, 0.05, seed=1)
    save_dataset(poisoned, tmp_path / "d.safetensors")
    back = load_dataset_file(tmp_path / "d.safetensors")
    for name in ("images", "labels", "poisoned", "original_labels", "noise"):
        assert torch.equal(getattr(back, name), getattr(poisoned, name))
    assert back.classes == data.classes and back.meta["attack"]["name"] == "wanet" and back.meta["seed"] == 1


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_registered_architecture_builds_and_classifies(arch):
    model = small_model(7, arch)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_vgg11_bn_width_builds_round_trips_and_is_range_checked(tmp_path):
    full = new_model("vgg11-bn", 10).net
    narrow = small_model(10, "vgg11-bn", width=0.25)
    assert set(narrow.net.state_dict()) == set(full.state_dict())  # same layers, narrower channels
    assert [m.out_channels for m in narrow.net.modules() if isinstance(m, torch.nn.Conv2d)][:3] == [16, 32, 64]
    assert narrow(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    save_model(narrow, tmp_path / "v.safetensors")
    back = load_model(tmp_path / "v.safetensors")
    assert back.spec.arch == "vgg11-bn" and back.spec.arch_args == {"width": 0.25}
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(narrow.to(memory_format=torch.channels_last)(x), back(x))
    for bad in (0, -1.0, 4.5, float("nan"), True, "0.5"):
        with pytest.raises(CleanseError, match=r"vgg11-bn width must be a number in \(0, 4\]"):
            new_model("vgg11-bn", 10, arch_args={"width": bad})


def test_torchvision_architecture_without_weights(tmp_path):
    model = new_model("torchvision:resnet18", 5, input_size=(3, 32, 32)).eval()
    save_model(model, tmp_path / "tv.safetensors")
    back = load_model(tmp_path / "tv.safetensors")
    model = model.to(memory_format=torch.channels_last)  # loaded models come back in channels_last
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), back(x))
    with pytest.raises(CleanseError, match="unknown torchvision classification model 'nope'"):
        new_model("torchvision:nope", 5)


def write_arch_file(path, body: str = ""):
    path.write_text(
        textwrap.dedent(f"""
        import torch.nn as nn
        def tiny(num_classes):
            return nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(4, num_classes),
            )
        {body}
    """)
    )


def test_user_factory_checkpoint_needs_explicit_arch_and_warns_on_change(tmp_path):
    arch_file = tmp_path / "myarch.py"
    write_arch_file(arch_file)
    spec = f"{arch_file}:tiny"
    model = new_model(spec, 3).eval()
    save_model(model, tmp_path / "u.safetensors")
    with pytest.raises(CleanseError, match=f"pass --arch {spec} to allow running that file"):
        load_model(tmp_path / "u.safetensors")
    back = load_model(tmp_path / "u.safetensors", ModelOptions(arch=spec))
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), back(x)) and back.notes == []
    write_arch_file(arch_file, "# edited")
    assert (
        "changed since the checkpoint was saved"
        in load_model(tmp_path / "u.safetensors", ModelOptions(arch=spec)).notes[0]
    )


def test_raw_state_dict_needs_arch_and_num_classes(tmp_path):
    model = new_model("cnn", 10)  # default width: a raw file carries no architecture arguments
    save_file(model.net.state_dict(), tmp_path / "raw.safetensors")
    with pytest.raises(CleanseError, match="raw state dict without cleanse metadata; add --arch and --num-classes"):
        load_model(tmp_path / "raw.safetensors")
    with pytest.raises(CleanseError, match=r"likely cause: wrong class count \(--num-classes 4\)"):
        load_model(tmp_path / "raw.safetensors", ModelOptions(arch="cnn", num_classes=4))
    with pytest.raises(CleanseError, match=r"likely cause: wrong architecture \(--arch resnet18\)"):
        load_model(tmp_path / "raw.safetensors", ModelOptions(arch="resnet18", num_classes=10))


def test_pth_is_loaded_weights_only_and_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CleanseError, match="refused to load: not a plain state dict"):
        load_model(tmp_path / "evil.pth", ModelOptions(arch="cnn", num_classes=10))
    assert not marker.exists()


def test_truncated_and_crafted_files_fail_with_one_line(tmp_path):
    model = small_model()
    save_model(model, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    cases = {
        "trunc.safetensors": (raw[: len(raw) // 2], "points past the end of the file"),
        "tiny.safetensors": (raw[:5], "truncated or not a safetensors file"),
        "header.safetensors": (struct.pack("<Q", len(raw)) + raw[8:], "file is truncated"),
        "absurd.safetensors": (struct.pack("<Q", 10**15) + raw[8:], "header length 1000000000000000 bytes is absurd"),
        "pickle.safetensors": (pickle.dumps({"a": 1}), "not a safetensors file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CleanseError, match=message) as info:
            load_model(tmp_path / name)
        assert "\n" not in info.value.message


def test_bad_metadata_is_refused(tmp_path):
    model = small_model()
    state = model.net.state_dict()
    good = model.spec.to_metadata()
    variants = {
        "notjson": ("{oops", "not valid JSON"),
        "format": (json.dumps({**good, "format": "cleanse.dataset"}), "not a model checkpoint"),
        "classes": (json.dumps({**good, "num_classes": "ten"}), "'num_classes' must be a positive integer"),
        "size": (json.dumps({**good, "input_size": [3, 32]}), "'input_size' is malformed"),
        "arch": (json.dumps({**good, "arch": "cnn"}), "metadata 'arch' must be"),
    }
    for name, (text, message) in variants.items():
        save_file(state, tmp_path / f"{name}.safetensors", metadata={"cleanse": text})
        with pytest.raises(CleanseError, match=message):
            load_model(tmp_path / f"{name}.safetensors")


def test_nan_weights_are_refused(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.net.head.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(CleanseError, match="holds NaN or Inf"):
        load_model(tmp_path / "nan.safetensors")


def test_options_that_disagree_with_metadata_are_refused(tmp_path):
    save_model(small_model(), tmp_path / "m.safetensors")
    with pytest.raises(CleanseError, match="--num-classes 5 disagrees with the checkpoint's metadata"):
        load_model(tmp_path / "m.safetensors", ModelOptions(num_classes=5))
