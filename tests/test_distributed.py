"""Data parallelism under torchrun (gloo on the CPU): a 2-process run against one process with the same global batch,
only rank 0 writing, and the pieces (sharded augmentation, batch split) checked in one process; `scan` with its
classes split over 2 ranks against one process, and its pieces (tests/scan_ranks_worker.py) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cleanse.engine.augment import flip_translate
from cleanse.engine.distributed import SINGLE, Ranks, check_batch, class_block, gather_rows, shard
from cleanse.errors import CleanseError
from cleanse.jobs.scan import _check_ranks

VIT = ["--arch", "vit", *(a for kv in ("depth=1", "dim=32", "heads=2", "mlp=64") for a in ("--arch-arg", kv))]


def _cleanse(args: list[str], cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = (launcher if ranks > 1 else [sys.executable]) + ["-m", "cleanse", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CLEANSE_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _train(tmp_path: Path, name: str, ranks: int, extra: list[str]) -> dict:
    args = ["train", "synthetic", "-o", f"{name}.safetensors", "--epochs", "2", "--batch-size", "128"]
    done = _cleanse([*args, "--device", "cpu", "--precision", "fp32", "--json", "-q", *extra], tmp_path, ranks)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model"] == f"{name}.safetensors"  # one JSON document: rank 0's
    return json.loads((tmp_path / f"{name}.safetensors.run.json").read_text())


@pytest.mark.slow  # trains (or unlearns) in two torchrun ranks and one process: 40-50 s on one thread
def test_two_ranks_train_the_weights_of_one_process_and_only_rank_0_writes(tmp_path):
    """Without BatchNorm the only difference is the order of float sums: measured 1.3e-6 after 2 epochs (AdamW)."""
    from safetensors.torch import load_file

    one = _train(tmp_path, "one", 1, VIT)
    two = _train(tmp_path, "two", 2, VIT)
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=1e-5)
    assert two["parameters"]["ranks"] == 2 and one["parameters"]["ranks"] == 1
    written = {p.name for p in tmp_path.iterdir() if p.name != "cache"}
    assert written == {"one.safetensors", "one.safetensors.run.json", "two.safetensors", "two.safetensors.run.json"}


@pytest.mark.slow
def test_two_ranks_with_batchnorm_on_the_cpu_stay_within_the_stated_tolerance(tmp_path):
    """gloo has no SyncBatchNorm: each rank normalises its half batch and running statistics are averaged each epoch.
    Measured on the synthetic set, 3 epochs: CA 0.756 vs 0.753, losses within 0.013."""
    extra = ["--arch-arg", "width=16,32,32", "--test", "synthetic:test", "--epochs", "3"]
    one, two = _train(tmp_path, "one", 1, extra), _train(tmp_path, "two", 2, extra)
    assert abs(one["metrics"]["clean_accuracy"] - two["metrics"]["clean_accuracy"]) <= 0.03
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=0.05)


def test_a_one_process_command_under_torchrun_refuses_before_any_work(tmp_path):
    done = _cleanse(["poison", "synthetic", "-o", "p.safetensors"], tmp_path, ranks=2)
    assert done.returncode != 0
    assert "error: this command runs in one process: start it without torchrun" in done.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_a_rank_augments_its_rows_exactly_as_one_process_augments_them():
    x = torch.rand(8, 3, 6, 6)
    whole = flip_translate(x, 2, True, torch.Generator().manual_seed(3))
    for rank in range(2):
        part = flip_translate(x[rank::2], 2, True, torch.Generator().manual_seed(3), (rank, 2))
        assert torch.equal(part, whole[rank::2])


def test_ranks_take_every_world_th_row_and_the_batch_must_split_evenly():
    rows = torch.arange(6)
    assert shard(rows, Ranks(1, 3)).tolist() == [1, 4] and torch.equal(shard(rows, Ranks()), rows)
    check_batch(128, Ranks(0, 2))
    with pytest.raises(CleanseError) as err:
        check_batch(100, Ranks(0, 3))
    assert str(err.value) == "--batch-size 100 does not split evenly over 3 ranks; use a multiple of 3"


# --- unlearn under torchrun ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unlearn_inputs(tmp_path_factory) -> Path:
    """Untrained models and a BadNets trigger: a 1-block ViT (no BatchNorm, so ranks can match one process to float
    rounding as they fine-tune), vit.safetensors; the tiny cnn (tar-ewc keeps its BatchNorm frozen), cnn.safetensors;
    t.safetensors."""
    from helpers import MEAN, STD, tiny_model

    from cleanse.attacks import poison_dataset
    from cleanse.data.synthetic import make_synthetic
    from cleanse.models import new_model, save_model

    folder = tmp_path_factory.mktemp("unlearn_ranks")
    _, trigger = poison_dataset(make_synthetic("train"), "badnets", 0, 0.1, seed=0)
    trigger.save(folder / "t.safetensors")
    vit = new_model("vit", 10, None, (3, 32, 32), MEAN, STD, {"depth": 1, "dim": 32, "heads": 2, "mlp": 64}, seed=0)
    save_model(vit, folder / "vit.safetensors")
    save_model(tiny_model(10), folder / "cnn.safetensors")
    return folder


def _unlearn(folder: Path, out: str, ranks: int, args: list[str], model: str = "vit") -> subprocess.CompletedProcess:
    base = ["unlearn", f"{model}.safetensors", "--data", "synthetic", "--clean-frac", "0.05", "-o", out]
    return _cleanse([*base, "--device", "cpu", "--precision", "fp32", "--json", "-q", *args], folder, ranks)


def _history(folder: Path, out: str) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k != "elapsed"}
        for row in json.loads((folder / f"{out}.run.json").read_text())["history"]
    ]


@pytest.mark.slow  # trains (or unlearns) in two torchrun ranks and one process: 40-50 s on one thread
def test_tar_ewc_over_two_ranks_follows_the_one_process_run_and_only_rank_0_writes(unlearn_inputs):
    """Each rank takes half of every batch, of the Fisher's samples and of each batch's triggered images; the loss,
    its parts and the batch ASR come back as the global batch's, so every figure of every check matches one process
    to float rounding (measured: 4e-7 on the losses, held-back figures equal)."""
    folder = unlearn_inputs
    args = ["--method", "tar-ewc", "--trigger", "t.safetensors", "--param", "epochs=2", "--param", "recovery_epochs=1"]
    for name, ranks in (("one", 1), ("two", 2)):
        done = _unlearn(folder, f"{name}.safetensors", ranks, args, model="cnn")
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["method"] == "tar-ewc"  # one JSON document: rank 0's
    one, two = _history(folder, "one.safetensors"), _history(folder, "two.safetensors")
    assert [(r["phase"], r["epoch"]) for r in two] == [(r["phase"], r["epoch"]) for r in one]
    assert len(one) == 9  # 8 checks over 2 passes of phase 1, then 1 recovery epoch
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "clean_ce", "ascent", "ewc", "batch_asr", "clean_accuracy", "attack_success_rate", "tar"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a, b)
    record = json.loads((folder / "two.safetensors.run.json").read_text())
    assert record["parameters"]["ranks"] == 2
    written = {p.name for p in folder.iterdir() if p.name.startswith(("one", "two"))}
    assert written == {"one.safetensors", "one.safetensors.run.json", "two.safetensors", "two.safetensors.run.json"}


@pytest.mark.slow
def test_finetune_over_two_ranks_gives_the_weights_of_one_process(unlearn_inputs):
    folder = unlearn_inputs
    args = ["--method", "finetune", "--epochs", "2", "--param", "ca_margin=1"]  # keeps the latest epoch's weights
    for name, ranks in (("ft1", 1), ("ft2", 2)):
        done = _unlearn(folder, f"{name}.safetensors", ranks, args)
        assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(folder / "ft1.safetensors"), load_file(folder / "ft2.safetensors")
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    one, two = _history(folder, "ft1.safetensors"), _history(folder, "ft2.safetensors")
    assert [r["loss"] for r in two if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r], abs=1e-5)


def test_a_recipe_that_does_not_split_its_batches_refuses_under_torchrun(unlearn_inputs):
    done = _unlearn(unlearn_inputs, "gp.safetensors", 2, ["--method", "ulrl"])
    assert done.returncode != 0
    assert (
        "error: ulrl does not split its batches over torchrun's ranks (those that do: finetune, tar-ewc); run it in "
        "one process, or use --method all (or a list of recipes) under torchrun to give each rank whole recipes"
    ) in done.stderr
    assert not (unlearn_inputs / "gp.safetensors").exists()


@pytest.mark.slow
def test_several_recipes_over_two_ranks_run_whole_and_rank_0_writes_them_all(unlearn_inputs):
    """Each rank runs every other recipe from the same start, subset and seed as one process would, so each recipe's
    weights are those of the one-process run. Three recipes (a list takes the path --method all takes): rank 0 runs
    two, rank 1 one."""
    folder = unlearn_inputs
    args = ["--method", "finetune,nad,tar-ewc", "--trigger", "t.safetensors", "--epochs", "1"]
    runs = {}
    for name, ranks in (("all1", 1), ("all2", 2)):
        done = _unlearn(folder, f"{name}.safetensors", ranks, args)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = json.loads(done.stdout)
    assert list(runs["all2"]["recipes"]) == list(runs["all1"]["recipes"]) == ["finetune", "nad", "tar-ewc"]
    from safetensors.torch import load_file

    for recipe in runs["all1"]["recipes"]:
        a, b = load_file(folder / f"all1.{recipe}.safetensors"), load_file(folder / f"all2.{recipe}.safetensors")
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5, recipe
        after1, after2 = runs["all1"]["recipes"][recipe]["after"], runs["all2"]["recipes"][recipe]["after"]
        assert after2["clean_accuracy"] == pytest.approx(after1["clean_accuracy"], abs=1e-6), recipe


@pytest.mark.slow
def test_an_interrupted_two_rank_run_leaves_nothing(tmp_path):
    """SIGTERM to torchrun reaches every rank; each stops as one process does and nothing is written."""
    import signal
    import threading
    import time

    from cleanse.data.dataset import save_dataset
    from cleanse.data.synthetic import make_synthetic

    out = tmp_path / "out"
    out.mkdir()
    data = tmp_path / "small.safetensors"  # epochs of a second or two: the signal lands early, in one of 200
    save_dataset(make_synthetic("train", n=512), data)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cleanse"]
    args = ["train", str(data), "-o", str(out / "m.safetensors"), "--epochs", "200", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CLEANSE_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*launcher, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("epoch 2/200" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=5)
    assert proc.returncode != 0
    text = "".join(lines)
    assert "terminated (SIGTERM) during epoch" in text and "no output was written" in text, text[-3000:]
    assert list(out.iterdir()) == []


def test_each_rank_gets_its_rows_of_every_batch_with_the_one_process_augmentation_even_when_batches_split_unevenly():
    from cleanse.data.synthetic import make_synthetic
    from cleanse.recipes.base import _batches, batches

    data = make_synthetic("test")
    data = type(data)(data.images[:21], data.labels[:21], data.classes)  # batches of 8, 8 and 5 rows
    cpu = torch.device("cpu")
    whole = list(batches(data, 8, torch.Generator().manual_seed(4), cpu))
    parts = [list(_batches(data, 8, torch.Generator().manual_seed(4), cpu, True, Ranks(r, 2))) for r in range(2)]
    assert [len(b[2]) for b in whole] == [8, 8, 5]
    for i, (x, y, idx) in enumerate(whole):
        for rank in range(2):
            px, py, pidx, rows = parts[rank][i]
            assert torch.equal(rows, idx) and torch.equal(pidx, idx[rank::2])
            assert torch.equal(px, x[rank::2]) and torch.equal(py, y[rank::2])


def test_a_mean_over_part_of_the_batch_sums_over_ranks_to_the_one_process_mean():
    from cleanse.recipes.base import RecipeRun

    run = RecipeRun.__new__(RecipeRun)  # batch_mean needs only the ranks and this batch's (or piece's) share
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])  # the batch's 5 eligible rows, of a global batch of 8 rows
    run.ranks, run._share = Ranks(), 1.0
    assert float(run.batch_mean(values, 5)) == pytest.approx(4.0)
    total = 0.0
    for rank, (mine, share) in enumerate(((values[:4], 5 / 8), (values[4:], 3 / 8))):  # rows fall unevenly
        run.ranks, run._share = Ranks(rank, 2), share
        total += share * float(run.batch_mean(mine, 5))  # what GradientSync's reduction adds up
    assert total == pytest.approx(4.0)
    # one process, the batch of 8 rows stepped in pieces of 3, 3 and 2 rows holding 2, 1 and 2 of the eligible ones:
    # step_pieces weights each piece's loss by its share of the rows, the same arithmetic
    run.ranks, total = Ranks(), 0.0
    for mine, part in ((values[:2], 3 / 8), (values[2:3], 3 / 8), (values[3:], 2 / 8)):
        run._share = part
        total += part * float(run.batch_mean(mine, 5))
    assert total == pytest.approx(4.0)


# --- scan under torchrun ---------------------------------------------------------------------------------------------


SCAN_ALL = ["--budget", "fast", "--steps", "20", "--schedule", "screened"]  # every detector, a 5-step screen


def _scan(tmp_path: Path, name: str, ranks: int, options: list[str]) -> tuple[dict, dict]:
    """A scan of the untrained 7-class cnn of `_scan_inputs` (16x16 images)."""
    args = ["scan", "inputs/tiny.safetensors", "--data", "inputs/seven.npz", "--n-clean", "70", "-o", name, *options]
    done = _cleanse([*args, "--device", "cpu", "--precision", "fp32", "--json", "-q"], tmp_path, ranks)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert json.loads(done.stdout) == json.loads((tmp_path / name / "scan.json").read_text())  # rank 0's document
    return json.loads(done.stdout), json.loads((tmp_path / name / "run.json").read_text())


def _scan_inputs(folder: Path) -> None:
    from helpers import MEAN, STD, write_npz

    from cleanse.models import new_model, save_model

    folder.mkdir()
    write_npz(folder / "seven.npz", 7, 10, size=16, seed=1)
    save_model(
        new_model("cnn", 7, None, (3, 16, 16), MEAN, STD, {"width": "4,8,8"}, seed=0), folder / "tiny.safetensors"
    )


def _written(tmp_path: Path) -> set[str]:
    """Every file and folder a run left in tmp_path, the inputs and the decode cache aside."""
    return {
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if p.relative_to(tmp_path).parts[0] not in ("cache", "inputs")
    }


def test_a_scan_over_two_ranks_writes_only_rank_0s_output_folder(tmp_path):
    _scan_inputs(tmp_path / "inputs")
    doc, record = _scan(tmp_path, "two", 2, ["--detectors", "patch", "--budget", "fast", "--steps", "10"])
    assert record["parameters"]["ranks"] == 2 and len(doc["classes"]) == 7
    pictures = {f"two/class-{k}-patch.png" for k in range(7)}
    triggers = {f"two/{c['trigger_file']}" for c in doc["detectors"]["patch"]["classes"] if c["trigger_file"]}
    assert _written(tmp_path) == {"two", "two/scan.json", "two/run.json", "two/sheet.png"} | pictures | triggers


@pytest.mark.slow
def test_two_ranks_scan_the_classes_of_one_process_and_only_rank_0_writes(tmp_path):
    """7 classes over 2 ranks (blocks of 4 and 3), every detector. Measured: every figure equal to the last bit."""
    _scan_inputs(tmp_path / "inputs")
    one, one_record = _scan(tmp_path, "one", 1, SCAN_ALL)
    two, two_record = _scan(tmp_path, "two", 2, SCAN_ALL)
    assert two["detectors_run"] == ["mmbd", "patch", "additive", "warp"]
    assert (two["backdoored"], two["suspected_targets"]) == (one["backdoored"], one["suspected_targets"])
    assert two["detectors"]["patch"]["screened_out"], "the screen must stop some classes"
    for name, detector in one["detectors"].items():
        other = two["detectors"][name]
        assert other["flagged"] == detector["flagged"], name
        for a, b in zip(detector["classes"], other["classes"], strict=True):
            assert [b[k] for k in ("flagged", "steps_run")] == [a[k] for k in ("flagged", "steps_run")], name
            assert b.get("screened_out") == a.get("screened_out"), name
            for key in ("statistic", "score", "attack_success_rate", "tar"):
                x, y = a.get(key), b.get(key)
                assert (x is None) == (y is None), (name, key, a["index"])
                assert x is None or y == pytest.approx(x, rel=1e-4, abs=1e-6), (name, key, a["index"])
    assert (one_record["parameters"]["ranks"], two_record["parameters"]["ranks"]) == (1, 2)
    assert len(two_record["history"]) == len(one_record["history"])  # every class's rows, gathered
    same_files = {f"{d}/{p.name}" for d in ("one", "two") for p in (tmp_path / "one").iterdir()}
    assert _written(tmp_path) == {"one", "two"} | same_files


def test_the_scan_pieces_split_over_two_ranks_give_what_one_process_gives(tmp_path):
    """gather_rows (uneven blocks, bool rows) and the reversal's screened schedule with early stopping, whose screen
    stops every class of rank 1 while rank 0's run on (tests/scan_ranks_worker.py)."""
    worker = Path(__file__).with_name("scan_ranks_worker.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launcher, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(tmp_path.iterdir())


def test_class_blocks_are_contiguous_in_rank_order_and_differ_by_at_most_one():
    for count, world in ((7, 2), (7, 3), (10, 4), (3, 3), (1000, 7)):
        blocks = [class_block(count, Ranks(r, world)) for r in range(world)]
        assert [k for b in blocks for k in b] == list(range(count))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1 and len(blocks[0]) == max(map(len, blocks))
    assert [list(class_block(7, Ranks(r, 3))) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert class_block(5, SINGLE) == range(5)
    rows = torch.rand(5, 2)
    assert gather_rows(rows, 5, SINGLE) is rows  # one process: the rows themselves


def test_scan_refuses_more_ranks_than_classes():
    _check_ranks(3, Ranks(0, 3))
    with pytest.raises(CleanseError) as err:
        _check_ranks(3, Ranks(1, 4))
    assert str(err.value) == (
        "scan splits the model's 3 classes over 4 torchrun ranks, which leaves some rank without a class; "
        "start at most 3 processes"
    )
