"""Shared fixtures: the synthetic data and small models trained once per test session, and the untrained inputs of the
hardening modules.

A test that uses `badnets_setup`, `clean_model` or `badnets_files` trains a model: mark it `@pytest.mark.slow`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from cleanse.attacks import poison_dataset
from cleanse.data import make_synthetic
from cleanse.engine.train import TrainConfig, train_model
from cleanse.models import new_model
from cleanse.training_defaults import data_normalization

# Registered before any test module imports them; the cleanse imports above never import these test modules.
pytest.register_assert_rewrite("helpers", "hardening_corpus")

SMALL_WIDTH = "32,64,64"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLEANSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@functools.cache
def synthetic(split: str = "train"):
    return make_synthetic(split)


def train_small(data, test=None, trigger=None, epochs: int = 8, seed: int = 0):
    mean, std = data_normalization(data)
    model = new_model("cnn", data.num_classes, data.classes, (3, 32, 32), mean, std, {"width": SMALL_WIDTH}, seed=seed)
    result = train_model(
        model, data, TrainConfig(epochs=epochs, seed=seed, precision="auto"), test=test, trigger=trigger
    )
    return model, result


@pytest.fixture(scope="session")
def badnets_setup():
    """A small cnn trained on synthetic data with 10% BadNets poisoning (target 0), plus its trigger."""
    poisoned, trigger = poison_dataset(synthetic("train"), "badnets", 0, 0.1, seed=0)
    model, result = train_small(poisoned, synthetic("test"), trigger)
    return model, trigger, result


@pytest.fixture(scope="session")
def clean_model():
    model, _ = train_small(synthetic("train"))
    return model


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def badnets_files(badnets_setup, tmp_path_factory):
    """The BadNets model and its trigger as files: bd.safetensors, bd.trigger.safetensors."""
    from cleanse.models import save_model

    model, trigger, _ = badnets_setup
    folder = tmp_path_factory.mktemp("badnets_files")
    save_model(model, folder / "bd.safetensors")
    trigger.save(folder / "bd.trigger.safetensors")
    return folder


@pytest.fixture(scope="session")
def untrained_files(tmp_path_factory):
    """The cnn of `badnets_files` (architecture, width, classes) at its initialisation, as bd.safetensors: for tests
    whose request is refused or whose check never depends on the weights' values. Trains nothing."""
    from cleanse.models import save_model

    data = synthetic("train")
    mean, std = data_normalization(data)
    model = new_model("cnn", data.num_classes, data.classes, (3, 32, 32), mean, std, {"width": SMALL_WIDTH}, seed=0)
    folder = tmp_path_factory.mktemp("untrained_files")
    save_model(model, folder / "bd.safetensors")
    return folder


SUMMARY_KEYS = (
    "clean_accuracy",
    "attack_success_rate",
    "robust_accuracy",
    "tar",
    "tar_median",
    "attention_share",
    "clean_tar",
)


def unlearn_removes_backdoor(folder, method: str, out, *extra: str, asr_after: float = 0.20, retention: float = 0.90):
    """`cleanse unlearn` on the synthetic BadNets model; checks the JSON contract and the issue's removal targets.

    Returns (result, summary, run record).
    """
    import json

    from typer.testing import CliRunner

    from cleanse.cli import app

    result = CliRunner().invoke(
        app,
        [
            "unlearn",
            str(folder / "bd.safetensors"),
            "--method",
            method,
            "--data",
            "synthetic",
            "--clean-frac",
            "0.05",
            "--test",
            "synthetic:test",
            "--trigger",
            str(folder / "bd.trigger.safetensors"),
            "-o",
            str(out),
            "--json",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    for side in ("before", "after"):
        assert set(SUMMARY_KEYS) <= set(s[side])
    assert {"der", "wall_seconds", "ca_retention"} <= set(s)
    b, a = s["before"], s["after"]
    print(
        f"{method} on synthetic: ASR {b['attack_success_rate']:.3f} -> {a['attack_success_rate']:.3f}, "
        f"CA {b['clean_accuracy']:.3f} -> {a['clean_accuracy']:.3f}, TAR {b['tar']:.2f} -> {a['tar']:.2f}, "
        f"kept {s['kept']['tag']}"
    )
    assert b["attack_success_rate"] > 0.8 and a["attack_success_rate"] < asr_after
    assert s["ca_retention"] >= retention
    record = json.loads(out.with_name(out.name + ".run.json").read_text())
    assert record["command"] == "unlearn" and record["parameters"]["method"] == method
    return result, s, record


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> dict[str, Path]:
    """Every input file of the hardening corpus (tests/hardening_corpus.py), written once per module."""
    from hardening_corpus import write_inputs

    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A 500-image dataset (fast epochs) and an untrained tiny model (fine-tuning it works all the same)."""
    from helpers import tiny_model, write_npz

    from cleanse.models import save_model

    root = tmp_path_factory.mktemp("small")
    data = write_npz(root / "small.npz", 10, 50, seed=1)
    save_model(tiny_model(10), root / "tiny.safetensors")
    return {"root": root, "data": data, "model": root / "tiny.safetensors", "cache": tmp_path_factory.mktemp("cache")}
