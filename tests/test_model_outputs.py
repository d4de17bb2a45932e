"""The output adapter: networks whose forward returns a tensor, a dict / HuggingFace-style output with `logits`, an
object with `.logits`, or a tuple whose first item is the logits all reach every caller as a logits tensor."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torchvision.models import InceptionOutputs
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel, ModelOptions, ModelSpec, load_model
from cleanse.models.wrapper import logits_of
from tests import tiny_archs
from tests.helpers import error_line

runner = CliRunner()
LOGITS = torch.arange(6.0).view(2, 3)
NEEDS = (
    "cleanse needs the class logits: a tensor, a mapping or an object with a 'logits' tensor, or a tuple/list "
    "whose first item is the logits tensor; wrap the network in a file.py:factory that returns them"
)


class ModelOutput(OrderedDict):
    """Like transformers.utils.ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


@dataclass
class WithLogits:
    logits: Any
    hidden: Any = None


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "out",
    [
        LOGITS,
        {"logits": LOGITS, "hidden": LOGITS + 1},
        ModelOutput(loss=None, logits=LOGITS),
        WithLogits(LOGITS, LOGITS + 1),
        (LOGITS, LOGITS + 1),
        [LOGITS],
        InceptionOutputs(LOGITS, LOGITS + 1),  # torchvision Inception/GoogLeNet in train mode
    ],
    ids=["tensor", "dict", "model-output", "object", "tuple", "list", "namedtuple"],
)
def test_logits_of_finds_the_logits(out):
    assert logits_of(out) is LOGITS


@pytest.mark.parametrize(
    "out, returned",
    [
        ({"scores": LOGITS, "hidden": LOGITS}, "a dict with keys 'scores', 'hidden'"),
        ({"logits": [1.0, 2.0]}, "a dict with keys 'logits'"),
        (WithLogits(None), "a WithLogits whose 'logits' is NoneType"),
        (("logits", LOGITS), "a tuple of 2 items whose first is str"),
        ((), "a tuple of 0 items whose first is nothing"),
        (None, "a NoneType"),
        (LOGITS.numpy(), "a ndarray"),
    ],
)
def test_anything_else_names_what_came_back_and_what_is_needed(out, returned):
    with pytest.raises(CleanseError) as caught:
        logits_of(out)
    assert caught.value.message == f"the network's forward returned {returned}; {NEEDS}"


@pytest.mark.parametrize("factory", [tiny_archs.hf_style, tiny_archs.tuple_out])
def test_the_wrapper_returns_the_logits_of_a_structured_output(factory):
    torch.manual_seed(0)
    net = factory(10).eval()
    spec = ModelSpec("x", 10, [str(i) for i in range(10)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    model = ClassifierModel(net, spec).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        want, _ = net.parts((x - 0.5) / 0.25)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)


@pytest.mark.slow
def test_an_hf_style_model_trains_scans_and_explains_end_to_end(tmp_path):
    arch = tiny_archs.arch("hf_style")
    model = tmp_path / "hf.safetensors"
    common = ["--device", "cpu", "--precision", "fp32"]
    result = run("train", "synthetic", "--arch", arch, "--epochs", "1", "--batch-size", "50", *common, "-o", model)
    assert result.exit_code == 0, result.output
    assert load_model(model, ModelOptions(arch=arch)).spec.arch == arch

    result = run(
        "scan", model, "--arch", arch, "--detectors", "mmbd", "--device", "cpu", "-o", tmp_path / "s", "--json"
    )
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(result.stdout)
    assert doc["detectors_run"] == ["mmbd"] and len(doc["classes"]) == 10

    out = tmp_path / "e"
    result = run("explain", model, "--arch", arch, "--data", "synthetic:test", "--n", "3", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    images = json.loads((out / "explain.json").read_text())["images"]
    assert len(images) == 3 and all(0 <= image["predicted"] < 10 for image in images)


BAD_ARCH = """
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        return {"scores": self.body(x)}


def build(num_classes):
    return Net(num_classes)
"""


def test_a_model_without_logits_is_refused_with_exit_2_and_nothing_written(tmp_path):
    (tmp_path / "bad.py").write_text(BAD_ARCH)
    out = tmp_path / "m.safetensors"
    result = run("train", "synthetic", "--arch", f"{tmp_path / 'bad.py'}:build", "--epochs", "1", "-o", out)
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"error: the network's forward returned a dict with keys 'scores'; {NEEDS}"
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py"]
