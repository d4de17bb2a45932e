"""The scan's memory budget: classes optimised in chunks (chunked == unchunked), the chunk arithmetic, the saved-tensor
estimate of one image's cost, --memory-budget, and out-of-memory as a one-line exit 2."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.engine import memory
from cleanse.engine.distributed import Ranks, class_block
from cleanse.engine.events import Event
from cleanse.engine.memory import (
    CPU_FORWARD_BYTES,
    FALLBACK_BYTES,
    IMAGE_COPIES,
    MemoryPlan,
    default_budget,
    is_out_of_memory,
    parse_memory,
    plan_memory,
    saved_bytes,
    saved_bytes_per_image,
    units_per_chunk,
)
from cleanse.errors import CleanseError
from cleanse.scan.detectors import mmbd, reversal
from cleanse.scan.detectors.mmbd import max_margins
from cleanse.scan.families import PATCH, WARP
from cleanse.scan.reverse import Budget, reverse_triggers

runner = CliRunner()


class Tiny(nn.Module):
    """5 classes on 6x6 images, a conv and a linear head; class 2 answers to a bright top-left pixel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.conv(x)).flatten(1))
        return out + torch.nn.functional.one_hot(torch.tensor(2), 5) * 20 * x[:, :, 0, 0].mean(1, keepdim=True)


def _data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(n, 6, 6, 3, generator=gen) * 100).to(torch.uint8), torch.arange(n) % 5


def _into(rows: list[dict]):
    return lambda event: rows.append(event.data)


def _same_rows(a: list[dict], b: list[dict], rel: float = 1e-6, abs_: float | None = None) -> bool:
    """History rows equal up to float rounding, the chunking's own fields aside."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for key in x.keys() - {"chunk", "forwards", "slices", "elapsed"}:
            if isinstance(x[key], list) and all(isinstance(v, float) for v in x[key]):
                if y[key] != pytest.approx(x[key], rel=rel, abs=abs_):
                    return False
            elif x[key] != y[key]:
                return False
    return True


@pytest.mark.parametrize("family, chunks", [(PATCH, (1, 2)), (WARP, (2,))], ids=["patch", "warp"])
def test_chunked_reversal_equals_unchunked(family, chunks):
    model = Tiny().eval()
    images, labels = _data()
    # early stopping on: classes retire at different rounds and the chunks are re-formed from those still live
    budget = Budget(steps=40, batch=8, round_steps=5, patience=1, early_stop=2)
    whole = reverse_triggers(model, images, labels, range(5), budget, seed=3, family=family)
    assert len(set(whole.steps_run.tolist())) > 1, whole.steps_run  # the chunks really change during the run
    for chunk in chunks:  # 1: class by class; 2: chunks of 2, 2 and 1, re-formed as classes retire
        rows: list[dict] = []
        parts = reverse_triggers(
            model, images, labels, range(5), budget, seed=3, family=family, chunk=chunk, callback=_into(rows)
        )
        assert parts.steps_run.tolist() == whole.steps_run.tolist()
        assert parts.reached.tolist() == whole.reached.tolist()
        for name, t in whole.tensors.items():
            assert torch.allclose(parts.tensors[name], t, rtol=0, atol=1e-6), (name, chunk)
        assert torch.allclose(parts.size, whole.size, rtol=1e-6)
        assert _same_rows(parts.history, whole.history)
        # progress: one row per round as before, saying how many forwards each step took
        assert len(rows) == len(whole.history)
        assert rows[0]["chunk"] == chunk and rows[0]["forwards"] == math.ceil(5 / chunk)
        after = [sum(r["active"]) for r in rows]  # a round's forwards: the classes live as it began, in chunks
        assert [r["forwards"] for r in rows[1:]] == [math.ceil(n / chunk) for n in after[:-1]]


@pytest.mark.parametrize("family, tol", [(PATCH, 1e-5), (WARP, 1e-3)], ids=["patch", "warp"])
def test_a_class_batch_cut_into_slices_reverses_as_the_whole_batch(family, tol):
    """One class per forward, its 8 images in slices of 3, 3 and 2 (or 1 each): the cross-entropy is the whole
    batch's mean, the size term counted once, so triggers, sizes, the end-of-round check and the history agree.
    Up to rounding, which Adam's normalised steps carry further in the warp's smooth field (1e-4 after 40 steps)."""
    model = Tiny().eval()
    images, labels = _data()
    budget = Budget(steps=40, batch=8, round_steps=5, patience=1, early_stop=2)
    whole = reverse_triggers(model, images, labels, range(5), budget, seed=3, family=family)
    for piece in (3, 1):
        rows: list[dict] = []
        parts = reverse_triggers(
            model,
            images,
            labels,
            range(5),
            budget,
            seed=3,
            family=family,
            chunk=1,
            images_per_forward=piece,
            callback=_into(rows),
        )
        assert parts.steps_run.tolist() == whole.steps_run.tolist()
        assert parts.reached.tolist() == whole.reached.tolist()
        for name, t in whole.tensors.items():
            assert torch.allclose(parts.tensors[name], t, rtol=0, atol=tol), (name, piece)
        assert torch.allclose(parts.size, whole.size, rtol=tol, atol=tol / 10)
        assert _same_rows(parts.history, whole.history, rel=tol, abs_=tol / 10)
        assert {r["slices"] for r in rows} == {math.ceil(8 / piece)} and {r["chunk"] for r in rows} == {1}


def test_the_slice_arithmetic_by_hand():
    # 1,000 bytes per image-step, a 10,000-byte forward: 10 images; a class of 32 is cut into slices of 10
    plan = MemoryPlan(budget=10**9, source="test", saved_per_image=1000, image_bytes=0, forward_bytes=10_000)
    assert plan.chunk(32, 100) == 1 and plan.images_per_forward(32) == 10
    assert plan.images_per_forward(8) == 8  # a class that fits is never cut
    assert replace(plan, forward_bytes=999).images_per_forward(32) == 1  # at least one image
    assert replace(plan, forward_bytes=None, budget=32_000).images_per_forward(32) == 32  # the budget alone decides


def test_chunked_mmbd_equals_unchunked_and_reports_progress_across_chunks(monkeypatch):
    monkeypatch.setattr(mmbd, "STEPS", 60)  # the test's time; 300 climbs the same way, longer
    model = Tiny().eval()
    whole, steps = max_margins(model, 5, (3, 6, 6), seed=1, precision="fp32")
    events: list[Event] = []
    parts, part_steps = max_margins(model, 5, (3, 6, 6), seed=1, precision="fp32", callback=events.append, chunk=2)
    assert part_steps.tolist() == steps.tolist()
    assert torch.allclose(parts, whole, rtol=1e-6, atol=1e-6)
    rows = [e.data for e in events]
    assert {r["chunks"] for r in rows} == {3} and [r["chunk"] for r in rows] == sorted(r["chunk"] for r in rows)
    assert {r["chunk"] for r in rows} == {1, 2, 3}  # each chunk reports at least once (its end)
    assert rows[-1]["classes_done"] == 5 and rows[-1]["active"] == 0
    assert all(r["classes_done"] + r["active"] == min(2 * r["chunk"], 5) for r in rows)  # no chunk not yet begun
    assert all(p.requires_grad for p in model.parameters())  # frozen during the climb only


def test_mmbd_on_a_block_of_classes_climbs_from_the_starts_of_one_process(monkeypatch):
    """A torchrun rank's block (class_block) draws and drops the starts of the classes before it, chunk by chunk."""
    monkeypatch.setattr(mmbd, "STEPS", 20)
    model = Tiny().eval()
    whole, steps = max_margins(model, 5, (3, 6, 6), seed=1, precision="fp32")
    for world, chunk in ((2, 2), (3, None)):  # blocks 3+2 (the second drops 3 classes' starts in pieces) and 2+2+1
        blocks = [class_block(5, Ranks(r, world)) for r in range(world)]
        parts = [max_margins(model, 5, (3, 6, 6), seed=1, precision="fp32", chunk=chunk, classes=b) for b in blocks]
        assert torch.cat([s for _, s in parts]).tolist() == steps.tolist()
        assert torch.allclose(torch.cat([m for m, _ in parts]), whole, rtol=1e-6, atol=1e-6), (world, chunk)


def test_the_chunk_arithmetic_by_hand():
    # 1 MiB budget, 1000 bytes per image, 32 images per class: 1048576 // 32000 = 32 classes
    assert units_per_chunk(2**20, 1000, 32, 100) == 32
    assert units_per_chunk(2**20, 1000, 32, 10) == 10  # never more than there are classes
    assert units_per_chunk(100, 1000, 32, 10) == 1  # at least one class, however small the budget
    assert units_per_chunk(64_000, 1000, 32, 10) == 2  # exactly two classes' worth
    assert units_per_chunk(63_999, 1000, 32, 10) == 1
    # the plan adds IMAGE_COPIES float copies of a (3,8,8) image (768 bytes each) to the saved bytes
    plan = MemoryPlan(budget=10 * 30 * (500 + IMAGE_COPIES * 768), source="test", saved_per_image=500, image_bytes=768)
    assert plan.per_image == 500 + 4 * 768
    assert plan.chunk(30, 100) == 10 and plan.chunk(15, 100) == 20 and plan.chunk(30, 4) == 4
    doc = plan.to_json()
    assert doc["bytes_per_image_step"] == plan.per_image and doc["saved_bytes_per_image"] == 500
    assert doc["budget_bytes"] == plan.budget and doc["image_copies"] == IMAGE_COPIES


def test_a_cpu_forward_is_cut_to_the_cpu_forward_bytes_whatever_the_budget():
    # 1,000 bytes per image-step, 32 images per class: a 1 MiB forward cap holds 32 classes, a 10 GiB budget 335,544
    plan = MemoryPlan(budget=10 * 2**30, source="test", saved_per_image=1000, image_bytes=0, forward_bytes=2**20)
    assert plan.forward_budget == 2**20 and plan.chunk(32, 1000) == 32 and plan.chunk(32, 10) == 10
    assert plan.to_json()["forward_bytes"] == 2**20
    # a budget below the cap decides, and a chunk still holds one class however large a class's images are
    assert replace(plan, budget=64_000).chunk(32, 1000) == 2
    assert replace(plan, saved_per_image=10**6).chunk(32, 1000) == 1
    # devices with their own memory: the budget alone
    unbounded = replace(plan, forward_bytes=None)
    assert unbounded.forward_budget == 10 * 2**30 and unbounded.chunk(32, 1000) == 1000
    assert unbounded.to_json()["forward_bytes"] is None
    # the plan for a model on the CPU carries the cap, and a --memory-budget does not lift it
    cpu = plan_memory(Tiny(), (3, 6, 6), "fp32", budget=10 * 2**30)
    assert cpu.forward_bytes == CPU_FORWARD_BYTES == 256 * 2**20 and cpu.forward_budget == CPU_FORWARD_BYTES
    assert cpu.chunk(32, 10**6) == CPU_FORWARD_BYTES // (cpu.per_image * 32)


def test_saved_tensor_estimate_against_a_hand_count():
    linear = nn.Linear(48, 10)
    x = torch.rand(5, 48)
    # a Linear whose weight needs a gradient saves its input: 5 x 48 float32; its own parameters are never counted
    assert saved_bytes(lambda: linear(x), linear.parameters()) == 5 * 48 * 4
    # one storage counted once however many ops save it
    assert saved_bytes(lambda: linear(x) + linear(x), linear.parameters()) == 5 * 48 * 4
    # per image, frozen weights, input needing a gradient: only ReLU's output (10 floats) is kept
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 3))
    assert saved_bytes_per_image(mlp, (3, 4, 4)) == 10 * 4
    # a convolution keeps its (3,6,6) input even with its weight frozen, and ReLU its (4,6,6) output
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    assert saved_bytes_per_image(conv, (3, 6, 6)) == (3 * 36 + 4 * 36) * 4
    assert all(p.requires_grad for p in conv.parameters())  # thawed again afterwards


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5gib", int(1.5 * 2**30)),
        ("64 KiB", 64 * 1024),
        ("1000000000", 10**9),
        ("7B", 7),
        (123, 123),
    ],
)
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


NOT_A_SIZE = (
    "--memory-budget {!r} is not a memory size; give bytes with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, "
    "TiB), e.g. 4GiB, 512MiB, 2GB or 1000000000"
)


@pytest.mark.parametrize(
    "text, message",
    [
        ("4G", NOT_A_SIZE.format("4G")),
        ("lots", NOT_A_SIZE.format("lots")),
        ("", NOT_A_SIZE.format("")),
        ("-1GiB", NOT_A_SIZE.format("-1GiB")),
        ("1e9", NOT_A_SIZE.format("1e9")),
        ("4GiBs", NOT_A_SIZE.format("4GiBs")),
        ("0", "--memory-budget '0' must be at least 1 byte; e.g. 4GiB or 512MiB"),
        ("0.5", "--memory-budget '0.5' must be at least 1 byte; e.g. 4GiB or 512MiB"),
    ],
)
def test_bad_memory_sizes_are_refused_with_one_line(text, message):
    with pytest.raises(CleanseError) as err:
        parse_memory(text)
    assert err.value.message == message


def test_bad_memory_budget_exits_2_before_anything(untrained_files, tmp_path):
    args = ["scan", str(untrained_files / "bd.safetensors"), "-o", str(tmp_path / "x"), "--memory-budget", "4G"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: " + NOT_A_SIZE.format("4G")
    assert not (tmp_path / "x").exists()


def test_the_default_budget_is_half_the_available_memory(tmp_path, monkeypatch):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", info)
    budget, source = default_budget(torch.device("cpu"))
    assert budget == 8000000 * 1024 // 2 and source.startswith("0.5 x MemAvailable")
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    assert default_budget(torch.device("cpu")) == (FALLBACK_BYTES, "fixed 2 GiB (MemAvailable (unreadable))")


def test_out_of_memory_is_recognised_on_every_device():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


SHORTCUT_NET = '''
import torch
from torch import nn


class Shortcut(nn.Module):
    """5 classes on 8x8 images: class 1 answers a bright top-left corner; the others a channel mix."""

    def __init__(self, num_classes):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Linear(3, num_classes - 1)
        self.gain = nn.Parameter(torch.tensor(30.0))

    def forward(self, x):
        corner = x[:, :, :2, :2].mean((1, 2, 3))
        rest = 4 * self.mix(x.mean((2, 3)))
        return torch.cat([rest[:, :1], (self.gain * corner - 10).unsqueeze(1), rest[:, 1:]], 1)


def build(num_classes):
    return Shortcut(num_classes)
'''


@pytest.fixture(scope="module")
def shortcut_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shortcut")
    (folder / "net.py").write_text(SHORTCUT_NET)
    namespace: dict = {}
    exec(SHORTCUT_NET, namespace)
    save_file(namespace["build"](5).state_dict(), folder / "raw.safetensors")
    rng = np.random.default_rng(0)
    np.savez(folder / "d.npz", x=rng.integers(0, 160, (100, 8, 8, 3), dtype=np.uint8), y=np.arange(100) % 5)
    return folder


def _scan_args(folder, out, *extra):
    arch = ["--arch", f"{folder / 'net.py'}:build", "--num-classes", "5", "--input-size", "3,8,8"]
    return [
        "scan",
        str(folder / "raw.safetensors"),
        *arch,
        "--mean",
        "0,0,0",
        "--std",
        "1,1,1",
        "--data",
        str(folder / "d.npz"),
        "--n-clean",
        "100",
        "--detectors",
        "mmbd,patch",
        "--budget",
        "fast",
        "--steps",
        "40",
        "--device",
        "cpu",
        "-o",
        str(out),
        "--json",
        *extra,
    ]


def test_a_tiny_memory_budget_scans_in_chunks_to_the_same_verdict(shortcut_files, tmp_path, monkeypatch):
    monkeypatch.setattr(mmbd, "STEPS", 60)  # the test's time
    whole = runner.invoke(app, _scan_args(shortcut_files, tmp_path / "whole"))
    assert whole.exit_code in (0, 1), whole.output
    chunked = runner.invoke(app, _scan_args(shortcut_files, tmp_path / "chunked", "--memory-budget", "1KiB"))
    assert chunked.exit_code == whole.exit_code, chunked.output
    a, b = json.loads(whole.stdout), json.loads(chunked.stdout)
    assert a["detectors"]["patch"]["chunk_classes"] == 5 and a["detectors"]["mmbd"]["chunk_classes"] == 5
    assert b["detectors"]["patch"]["chunk_classes"] == 1 and b["detectors"]["mmbd"]["chunks"] == 5
    # a class's batch fits a forward by default, and is cut to one image per forward within 1 KiB (MM-BD's is not cut)
    whole_batch = a["detectors"]["patch"]["images_per_class"]
    assert a["detectors"]["patch"]["images_per_forward"] == whole_batch == b["detectors"]["patch"]["images_per_class"]
    assert b["detectors"]["patch"]["images_per_forward"] == 1 and "images_per_forward" not in b["detectors"]["mmbd"]
    assert b["memory"]["budget_bytes"] == 1024 and b["memory"]["budget_source"] == "--memory-budget"
    assert a["memory"]["bytes_per_image_step"] == b["memory"]["bytes_per_image_step"] > 0
    for key in ("backdoored", "suspected_targets", "unconfirmed", "evidence"):
        assert a[key] == b[key], key
    for name in ("patch", "mmbd"):
        stats_a = [c["statistic"] for c in a["detectors"][name]["classes"]]
        stats_b = [c["statistic"] for c in b["detectors"][name]["classes"]]
        assert stats_b == pytest.approx(stats_a, rel=1e-5)
    assert json.loads((tmp_path / "chunked" / "run.json").read_text())["parameters"]["memory_budget"] == 1024


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes."),
        MemoryError(),
    ],
    ids=["cuda", "cpu-allocator", "python"],
)
def test_out_of_memory_exits_2_naming_the_memory_budget_and_writes_nothing(
    shortcut_files, tmp_path, monkeypatch, error
):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(mmbd, "_climb", fail)
    result = runner.invoke(app, _scan_args(shortcut_files, tmp_path / "s", "--memory-budget", "1GiB"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()  # the detector notes, then one error line
    assert [line for line in lines if line.startswith("error")] == lines[-1:]
    assert lines[-1] == (
        "error: out of memory on cpu in the mmbd detector (5 class(es) x 30 images per step, memory budget 1 GiB from "
        "--memory-budget); pass a smaller --memory-budget, e.g. --memory-budget 64MiB"
    )  # a quarter of what a CPU forward held: the CPU's 256 MiB cap, below the 1 GiB budget
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())  # no half-written folder, no temp left
    one = runner.invoke(app, _scan_args(shortcut_files, tmp_path / "s", "--memory-budget", "1"))
    assert one.exit_code == 2 and "one class per step already" in one.stderr and "another --device" in one.stderr
    assert not list(tmp_path.iterdir())


def test_out_of_memory_in_the_reversal_names_its_slices(shortcut_files, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(reversal, "reverse_triggers", fail)
    args = _scan_args(shortcut_files, tmp_path / "s", "--memory-budget", "1")
    args[args.index("mmbd,patch")] = "patch"
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: out of memory on cpu in the patch detector (1 class(es) x 24 images per step, in slices of 1, "
        "one image per forward already, memory budget 1 B from --memory-budget): a smaller --memory-budget cannot "
        "go below that; free memory on the device or scan on another --device"
    )
    assert not list(tmp_path.iterdir())


def test_an_error_that_is_not_out_of_memory_stays_internal(shortcut_files, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("shapes cannot be multiplied")

    monkeypatch.setattr(mmbd, "_climb", fail)
    result = runner.invoke(app, _scan_args(shortcut_files, tmp_path / "s"))
    assert result.exit_code == 3 and "internal error" in result.stderr
