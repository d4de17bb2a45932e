"""Models cleanse did not train: raw state dicts (.safetensors, .pth) with the architecture given on the command
line."""

from __future__ import annotations

import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.errors import CleanseError
from cleanse.files import sha256_file
from cleanse.models import ModelOptions, build_net, load_model, new_model, save_model
from tests.conftest import synthetic

runner = CliRunner()
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
ARCH_FILE = """
from torch import nn


def build(num_classes, hidden=8):
    return nn.Sequential(
        nn.Conv2d(3, hidden, 3, stride=2, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.BatchNorm2d(2 * hidden), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * hidden, num_classes))
"""
RAW_FILES = ["raw.safetensors", "sd.pth", "nested.pth", "dataparallel.pth", "lightning.ckpt"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def usage_error(result, message: str) -> str:
    """The command exited 2 with exactly one line on stderr, containing `message`."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    return lines[0]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float().div(255)


def users_own_net(folder, train: bool = True):
    """A user's own network (my_net.py:build), trained with a plain torch loop (unless `train` is false) and saved five
    ways."""
    (folder / "my_net.py").write_text(textwrap.dedent(ARCH_FILE))
    spec = importlib.util.spec_from_file_location("users_own_net", folder / "my_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    net = module.build(10)
    test = synthetic("test")
    x, y = to_unit(test.images), test.labels
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen, threads = torch.Generator().manual_seed(0), torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small trains fastest on one thread
    try:
        for _ in range(60 if train else 0):
            i = torch.randint(0, len(x), (32,), generator=gen)
            loss = F.cross_entropy(net((x[i] - mean) / std), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    state = net.state_dict()
    save_file(state, folder / "raw.safetensors")
    torch.save(state, folder / "sd.pth")
    torch.save({"state_dict": state, "epoch": 3, "optimizer": optimizer.state_dict()}, folder / "nested.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, folder / "dataparallel.pth")
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()}}, folder / "lightning.ckpt")
    images = x[:64]
    with torch.no_grad():
        logits = net((images - mean) / std)
    small = test.subset(torch.cat([(test.labels == c).nonzero().flatten()[:20] for c in range(10)]))  # 20 per class
    np.savez(folder / "small.npz", x=small.images.numpy(), y=small.labels.numpy())
    arch = f"{folder / 'my_net.py'}:build"
    options = ["--arch", arch, "--num-classes", "10", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    return {"folder": folder, "arch": arch, "options": options, "images": images, "logits": logits}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's network, trained: BatchNorm statistics and weights away from their initial values."""
    return users_own_net(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def untrained_user(tmp_path_factory):
    """The same five files of the network at its initialisation: for refusals, which never depend on the weights'
    values."""
    return users_own_net(tmp_path_factory.mktemp("raw-untrained"), train=False)


@pytest.mark.parametrize("name", RAW_FILES)
@pytest.mark.slow
def test_raw_files_predict_like_the_original_module(user, name):
    path = user["folder"] / name
    model = load_model(path, ModelOptions(arch=user["arch"], num_classes=10, mean=MEAN, std=STD))
    with torch.no_grad():
        logits = model(user["images"])
    assert torch.allclose(logits, user["logits"], atol=1e-5, rtol=1e-4)
    assert torch.equal(logits.argmax(1), user["logits"].argmax(1))
    assert model.spec.provenance == {"imported_from": str(path), "source_sha256": sha256_file(path)}
    assert model.spec.input_size == (3, 32, 32) and model.spec.mean == MEAN
    if name == "lightning.ckpt":
        assert "note: removed the prefix 'model.' that every key in lightning.ckpt carries" in model.notes


@pytest.mark.slow
def test_explain_on_a_raw_safetensors_state_dict(user, tmp_path):
    out = tmp_path / "maps"
    result = run(
        "explain",
        user["folder"] / "raw.safetensors",
        "--data",
        "synthetic:test",
        "--n",
        "4",
        "-o",
        out,
        *user["options"],
    )
    assert result.exit_code == 0, result.output
    assert (
        "raw.safetensors is a raw state dict: assuming --input-size 3,32,32 "
        "(give the option if the model expects otherwise)" in result.stderr
    )
    assert (out / "explain.json").is_file() and len(list(out.glob("*.png"))) >= 4
    record = json.loads((out / "run.json").read_text())
    assert record["inputs"]["model"]["sha256"] == sha256_file(user["folder"] / "raw.safetensors")


@pytest.mark.slow
def test_unlearn_on_a_nested_pth_writes_a_full_checkpoint(user, tmp_path):
    source = user["folder"] / "nested.pth"
    out = tmp_path / "clean.safetensors"
    result = run(
        "unlearn",
        source,
        "--method",
        "finetune",
        "--epochs",
        "1",
        "--data",
        user["folder"] / "small.npz",
        "--clean-n",
        "60",
        "--precision",
        "fp32",
        "-o",
        out,
        "--input-size",
        "3,32,32",
        *user["options"],
    )
    assert result.exit_code == 0, result.output
    assert "assuming" not in result.stderr
    # The output carries everything: only the architecture file must be named again (it is code; metadata never runs
    # it).
    usage = pytest.raises(CleanseError, match=f"pass --arch {user['arch']} to allow running that file")
    with usage:
        load_model(out)
    back = load_model(out, ModelOptions(arch=user["arch"]))
    assert back.spec.num_classes == 10 and back.spec.mean == MEAN and back.spec.std == STD
    prov = back.spec.provenance
    assert (
        prov["command"] == "unlearn" and prov["parent_sha256"] == sha256_file(source) and prov["parent"] == str(source)
    )
    assert back.spec.arch_file_sha256 == sha256_file(user["folder"] / "my_net.py")


def test_pickled_objects_are_refused_and_never_run(untrained_user, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = load_model(
        untrained_user["folder"] / "raw.safetensors", ModelOptions(arch=untrained_user["arch"], num_classes=10)
    ).net.state_dict()
    torch.save(Evil(), tmp_path / "evil.pth")
    torch.save({"state_dict": state, "hook": Evil()}, tmp_path / "evil-beside-weights.pth")
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "whole-module.pth")
    expected = {
        "evil.pth": "io.open",
        "evil-beside-weights.pth": "io.open",
        "whole-module.pth": "torch.nn.modules.container.Sequential",
    }
    for name, culprit in expected.items():
        result = run(
            "explain",
            tmp_path / name,
            "--data",
            "synthetic:test",
            "--n",
            "2",
            "-o",
            tmp_path / f"o-{name}",
            *untrained_user["options"],
        )
        line = usage_error(
            result, f"refused to load: not a plain state dict of tensors (it pickles {culprit}, which is never run"
        )
        assert "save model.state_dict() with torch.save" in line and "\x1b" not in line
    assert not marker.exists()
    assert not any(p.name.startswith("o-") for p in tmp_path.iterdir())


def test_wrong_class_count_or_architecture_names_the_keys_and_the_cause(untrained_user, tmp_path):
    raw = untrained_user["folder"] / "raw.safetensors"
    opts = untrained_user["options"][:]
    opts[opts.index("--num-classes") + 1] = "5"
    line = usage_error(
        run("explain", raw, "--data", "synthetic:test", "-o", tmp_path / "a", *opts), "weights do not fit"
    )
    assert "shape mismatches 8.weight (10, 16) vs (5, 16); 8.bias (10,) vs (5,) (2)" in line
    assert (
        "likely cause: wrong class count (--num-classes 5); the weights have 10 classes: pass --num-classes 10" in line
    )
    line = usage_error(
        run(
            "explain",
            raw,
            "--data",
            "synthetic:test",
            "-o",
            tmp_path / "b",
            "--arch",
            "resnet18",
            "--num-classes",
            "10",
        ),
        "weights do not fit resnet18: missing keys conv1.weight, bn1.weight, bn1.bias ...",
    )
    assert "unexpected keys 0.bias, 0.weight, 1.bias ..." in line
    assert "likely cause: wrong architecture (--arch resnet18); the file's first keys are 0.bias, 0.weight" in line


def test_missing_options_are_named(untrained_user, tmp_path):
    raw = untrained_user["folder"] / "raw.safetensors"
    line = usage_error(
        run("explain", raw, "--data", "synthetic:test", "-o", tmp_path / "a"),
        "raw.safetensors: raw state dict without cleanse metadata; add --arch and --num-classes "
        "(--arch NAME|torchvision:NAME|path/file.py:factory, --num-classes N; 8.weight has 10 outputs)",
    )
    assert "--input-size C,H,W and --preset cifar10|imagenet|none or --mean/--std" in line
    usage_error(
        run("explain", raw, "--data", "synthetic:test", "-o", tmp_path / "a", "--arch", untrained_user["arch"]),
        "raw state dict without cleanse metadata; add --num-classes (--num-classes N; 8.weight has 10 outputs), "
        "and --input-size",
    )
    usage_error(
        run(
            "explain",
            raw,
            "--data",
            "synthetic:test",
            "-o",
            tmp_path / "a",
            "--arch",
            "my_net.py",
            "--num-classes",
            "10",
        ),
        "--arch 'my_net.py' must name the factory function too: --arch path/to/file.py:factory",
    )
    usage_error(
        run("explain", raw, "--data", "synthetic:test", "-o", tmp_path / "a", "--arch", "mynet", "--num-classes", "10"),
        "unknown architecture 'mynet'; --arch takes a registry name (cnn, ",
    )


@pytest.mark.slow
def test_arch_arg_round_trip_through_unlearn_and_train(user, tmp_path):
    model = new_model("cnn", 10, arch_args={"width": "32,64,64"}, mean=[0.0] * 3, std=[1.0] * 3, seed=1).eval()
    raw = tmp_path / "cnn-small.safetensors"
    save_file(model.net.state_dict(), raw)
    base = ["--arch", "cnn", "--num-classes", "10", "--input-size", "3,32,32", "--preset", "none"]
    data = [
        "--data",
        user["folder"] / "small.npz",
        "--clean-n",
        "60",
        "--method",
        "finetune",
        "--epochs",
        "1",
        "--precision",
        "fp32",
    ]
    usage_error(
        run("unlearn", raw, *data, "-o", tmp_path / "x.safetensors", *base),
        "likely cause: wrong architecture arguments (--arch-arg, given: none): "
        "the layer names fit cnn but their sizes do not",
    )
    loaded = load_model(
        raw, ModelOptions(arch="cnn", num_classes=10, mean=[0.0] * 3, std=[1.0] * 3, arch_args={"width": "32,64,64"})
    )
    x = user["images"][:8]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=1e-4)

    out = tmp_path / "cnn-small.finetune.safetensors"
    result = run("unlearn", raw, *data, *base, "--arch-arg", "width=32,64,64")
    assert result.exit_code == 0, result.output
    back = load_model(out)  # no options at all
    assert back.spec.arch == "cnn" and back.spec.arch_args == {"width": "32,64,64"} and back.spec.mean == [0.0] * 3
    assert back.spec.provenance["parent_sha256"] == sha256_file(raw)

    trained = tmp_path / "cnn-small.trained.safetensors"
    result = run(
        "train",
        user["folder"] / "small.npz",
        "--init",
        raw,
        "-o",
        trained,
        "--epochs",
        "1",
        "--precision",
        "fp32",
        *base,
        "--arch-arg",
        "width=32,64,64",
    )
    assert result.exit_code == 0, result.output
    back = load_model(trained)
    assert back.spec.arch_args == {"width": "32,64,64"}
    assert back.spec.provenance["parent_sha256"] == sha256_file(raw)
    assert back.spec.provenance["imported_from"]["source_sha256"] == sha256_file(raw)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--arch", "cnn", "--arch-arg", "weights=DEFAULT"],
            "--arch-arg weights=... is refused: cleanse never downloads or loads weights",
        ),
        (["--arch", "torchvision:resnet18", "--arch-arg", "pretrained=true"], "--arch-arg pretrained=... is refused"),
        (["--arch", "cnn", "--arch-arg", "width"], "--arch-arg 'width' must look like NAME=VALUE"),
        (
            ["--arch", "cnn", "--arch-arg", "depth=3"],
            "architecture cnn does not take argument 'depth'; it takes: width",
        ),
        (["--arch", "cnn", "--arch-arg", "num_classes=3"], "pass the class count as --num-classes"),
        (
            ["--arch", "torchvision:resnet18", "--arch-arg", "norm_layer=x"],
            "torchvision architectures do not take --arch-arg 'norm_layer'",
        ),
    ],
)
def test_arch_arg_refusals(untrained_user, tmp_path, args, message):
    usage_error(
        run(
            "explain",
            untrained_user["folder"] / "raw.safetensors",
            "--data",
            "synthetic:test",
            "-o",
            tmp_path / "o",
            "--num-classes",
            "10",
            *args,
        ),
        message,
    )


def test_metadata_cannot_ask_for_weights_or_disagree_with_arch_arg(tmp_path):
    doc = {
        "format": "cleanse.model",
        "format_version": 1,
        "arch": {"name": "torchvision:resnet18", "args": {"weights": "DEFAULT"}},
        "num_classes": 2,
        "classes": ["a", "b"],
        "input_size": [3, 32, 32],
        "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3},
        "provenance": {},
    }
    save_file({"w": torch.zeros(2)}, tmp_path / "crafted.safetensors", metadata={"cleanse": json.dumps(doc)})
    with pytest.raises(CleanseError, match="--arch-arg weights=... is refused"):
        load_model(tmp_path / "crafted.safetensors")
    save_model(new_model("cnn", 10, arch_args={"width": "8,16,16"}), tmp_path / "m.safetensors")
    with pytest.raises(
        CleanseError, match=r"--arch-arg \{'width': '32,64,64'\} disagrees with the checkpoint's metadata"
    ):
        load_model(tmp_path / "m.safetensors", ModelOptions(arch_args={"width": "32,64,64"}))
    assert load_model(tmp_path / "m.safetensors", ModelOptions(arch_args={"width": "8,16,16"})).spec.arch_args == {
        "width": "8,16,16"
    }


def test_torchvision_takes_allow_listed_plain_arguments():
    net, _ = build_net("torchvision:mobilenet_v3_small", 3, {"dropout": 0.1})
    assert net.classifier[2].p == 0.1 and net.classifier[3].out_features == 3


def test_torch_files_without_one_clear_state_dict(untrained_user, tmp_path):
    state = torch.load(untrained_user["folder"] / "sd.pth", weights_only=True)
    cases = {
        "meta.pth": (
            {"epoch": 3, "lr": 0.1},
            "no state dict of tensors found (top-level keys: epoch, lr; looked for state_dict",
        ),
        "two.pth": ({"student": state, "teacher": state}, "holds several state dicts (student, teacher)"),
        "list.pth": ([1, 2], "holds a list, not a state dict of tensors"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CleanseError) as info:
            load_model(tmp_path / name, ModelOptions(arch=untrained_user["arch"], num_classes=10))
        assert message in info.value.message
    torch.save({"ema": state, "epoch": 3}, tmp_path / "ema.pth")  # one nested state dict under any key is found
    assert (
        load_model(tmp_path / "ema.pth", ModelOptions(arch=untrained_user["arch"], num_classes=10)).spec.num_classes
        == 10
    )
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CleanseError, match="refused to load: not a plain state dict of tensors, or not a torch file"):
        load_model(tmp_path / "text.pth", ModelOptions(arch=untrained_user["arch"], num_classes=10))
