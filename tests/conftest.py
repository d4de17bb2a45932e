"""Shared fixtures: the synthetic data and small models trained once per run (shared by pytest-xdist's workers through
files, `trained_once`), and the untrained inputs of the hardening modules.

A test that uses `badnets_setup`, `clean_model` or `badnets_files` trains a model: mark it `@pytest.mark.slow`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

from cleanse.attacks import load_trigger, poison_dataset
from cleanse.data import make_synthetic
from cleanse.engine.train import TrainConfig, train_model
from cleanse.models import load_model, new_model, save_model
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


def _build_badnets(folder: Path) -> None:
    poisoned, trigger = poison_dataset(synthetic("train"), "badnets", 0, 0.1, seed=0)
    model, result = train_small(poisoned, synthetic("test"), trigger)
    save_model(model, folder / "model.safetensors")
    trigger.save(folder / "trigger.safetensors")
    (folder / "result.json").write_text(json.dumps(result))


def _build_clean(folder: Path) -> None:
    save_model(train_small(synthetic("train"))[0], folder / "model.safetensors")


def _build_badnets_scan(folder: Path) -> None:
    """`cleanse scan` of the BadNets model with every detector its inputs allow (`--budget fast`): the output folder,
    the exit code and what it printed."""
    from typer.testing import CliRunner

    from cleanse.cli import app

    model = folder.parent / "trained-badnets" / "model.safetensors"
    argv = ["scan", str(model), "--data", "synthetic:test", "--budget", "fast", "-o", str(folder / "bd.scan"), "--json"]
    result = CliRunner().invoke(app, argv)
    printed = {"exit_code": result.exit_code, "stdout": result.stdout, "output": result.output}
    (folder / "result.json").write_text(json.dumps(printed))


# What is built once per run: a name, what fills its folder, and the names it needs built first.
TRAINED: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "badnets": (_build_badnets, ()),
    "clean": (_build_clean, ()),
    "badnets-scan": (_build_badnets_scan, ("badnets",)),
}


def _trained_folder(tmp_path_factory, name: str) -> Path:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above each worker's own
    return root / f"trained-{name}"


def _build_if_free(tmp_path_factory, name: str, wait: bool) -> bool:
    """Build `name` unless it is built; False when another worker holds its lock and `wait` is off."""
    folder = _trained_folder(tmp_path_factory, name)
    try:
        with FileLock(str(folder) + ".lock", timeout=-1 if wait else 0):
            if not _built(tmp_path_factory, name):
                folder.mkdir(exist_ok=True)
                # The threads of a one-process run, whatever the worker's share: the same weights either way.
                threads = torch.get_num_threads()
                torch.set_num_threads(max(1, min(2, _cores())))
                try:
                    TRAINED[name][0](folder)
                finally:
                    torch.set_num_threads(threads)
                (folder / "done").touch()
    except Timeout:
        return False
    return True


def trained_once(tmp_path_factory, name: str) -> Path:
    """The folder of `name` of TRAINED (after what it needs), built once for the whole run. Under pytest-xdist the first
    worker to ask builds it behind a file lock in the folder the workers share; a worker that finds it being built
    first builds whatever else nobody has started (and whose needs are built), then waits."""
    for need in TRAINED[name][1]:
        trained_once(tmp_path_factory, need)
    if not _build_if_free(tmp_path_factory, name, wait=False):
        for other, (_, needs) in TRAINED.items():
            if other != name and all(_built(tmp_path_factory, n) for n in needs):
                _build_if_free(tmp_path_factory, other, wait=False)
        _build_if_free(tmp_path_factory, name, wait=True)
    return _trained_folder(tmp_path_factory, name)


def _built(tmp_path_factory, name: str) -> bool:
    return (_trained_folder(tmp_path_factory, name) / "done").exists()


@pytest.fixture(scope="session")
def badnets_setup(tmp_path_factory):
    """A small cnn trained on synthetic data with 10% BadNets poisoning (target 0), plus its trigger and the
    training result."""
    folder = trained_once(tmp_path_factory, "badnets")
    result = json.loads((folder / "result.json").read_text())
    return load_model(folder / "model.safetensors"), load_trigger(folder / "trigger.safetensors"), result


@pytest.fixture(scope="session")
def clean_model(tmp_path_factory):
    return load_model(trained_once(tmp_path_factory, "clean") / "model.safetensors")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most four, since each holds its own models and data. (CI runs one process:
    on two cores the workers gave no reliable gain; docs/contributing.md.)"""
    return max(1, min(4, _cores()))


def pytest_configure(config):
    # Under pytest-xdist the workers share the cores: each gets its share, never more than two threads.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, _cores() // workers)))


@pytest.fixture(scope="session")
def badnets_files(badnets_setup, tmp_path_factory):
    """The BadNets model and its trigger as files: bd.safetensors, bd.trigger.safetensors."""
    model, trigger, _ = badnets_setup
    folder = tmp_path_factory.mktemp("badnets_files")
    save_model(model, folder / "bd.safetensors")
    trigger.save(folder / "bd.trigger.safetensors")
    return folder


@pytest.fixture(scope="session")
def untrained_files(tmp_path_factory):
    """The cnn of `badnets_files` (architecture, width, classes) at its initialisation, as bd.safetensors: for tests
    whose request is refused or whose check never depends on the weights' values. Trains nothing."""
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

    root = tmp_path_factory.mktemp("small")
    data = write_npz(root / "small.npz", 10, 50, seed=1)
    save_model(tiny_model(10), root / "tiny.safetensors")
    return {"root": root, "data": data, "model": root / "tiny.safetensors", "cache": tmp_path_factory.mktemp("cache")}
