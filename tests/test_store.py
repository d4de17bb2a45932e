"""Data larger than memory: memory-mapped dataset files and decode cache, streamed writes, chunked resizing and
evaluation, poisoning that copies only the rows it changes, and the center-crop preprocessing."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cleanse.attacks import poison_dataset
from cleanse.data import Dataset, load_data, load_dataset_file, save_dataset, sources
from cleanse.data.dataset import DATASET_FILE
from cleanse.data.preprocess import PREPROCESSING, fit_array, fit_in_chunks, fit_tensor, scaled_size
from cleanse.engine.evaluate import TriggeredSet, evaluate, predict, predict_triggered
from cleanse.errors import CleanseError
from cleanse.files import METADATA_KEY, safetensors_header, sha256_file, write_tensor_bytes
from cleanse.models import ModelOptions, load_model, new_model, save_model
from cleanse.models.spec import PREPROCESSING as RECORDED
from tests.conftest import synthetic
from tests.test_data import make_folder, png


def _same(a: Dataset, b: Dataset) -> None:
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for name in ("poisoned", "original_labels", "noise"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_mapped_dataset_file_round_trips_exactly_and_an_edit_never_reaches_the_file(tmp_path):
    poisoned, _ = poison_dataset(synthetic("test"), "wanet", 0, 0.1, seed=3)
    path = tmp_path / "d.safetensors"
    save_dataset(poisoned, path)
    back = load_dataset_file(path)
    _same(back, poisoned)
    assert back.classes == poisoned.classes and back.meta == poisoned.meta
    digest = sha256_file(path)
    back.images[:5] = 0  # copy-on-write: this process's pages change, the file does not
    assert sha256_file(path) == digest
    _same(load_dataset_file(path), poisoned)


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no RssAnon in /proc/self/status")


def _write_big_dataset(path: Path, rows: int, hw: int) -> None:
    """A dataset file of `rows` random images, written a block at a time (never whole in memory)."""
    doc = {**DATASET_FILE.header(), "classes": ["a", "b"]}
    entries = [("images", torch.uint8, [rows, hw, hw, 3]), ("labels", torch.int64, [rows])]
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as fh:
        fh.write(safetensors_header(entries, {METADATA_KEY: json.dumps(doc)}))
        for start in range(0, rows, 1024):
            write_tensor_bytes(fh, torch.randint(0, 256, (min(1024, rows - start), hw, hw, 3), generator=gen).byte())
        write_tensor_bytes(fh, torch.arange(rows) % 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
def test_a_dataset_file_far_larger_than_the_cap_does_not_grow_anonymous_memory(tmp_path):
    rows, hw, cap_mib = 16384, 64, 24  # a 201 MB file against a 24 MiB cap
    path = tmp_path / "big.safetensors"
    _write_big_dataset(path, rows, hw)
    gc.collect()
    before = _anon_kib()
    data = load_dataset_file(path)
    pick = torch.tensor([0, 4097, rows - 1])
    rows_seen = data.images[pick]
    sub = data.subset(torch.arange(100, 164))
    poisoned, _ = poison_dataset(data, "badnets", 0, 0.01, seed=0)  # 164 rows change: only they are copied
    grown_mib = (_anon_kib() - before) / 1024
    print(f"\n{path.stat().st_size / 2**20:.0f} MiB file: RssAnon grew {grown_mib:.1f} MiB")
    assert grown_mib < cap_mib
    assert rows_seen.shape == (3, hw, hw, 3) and len(sub) == 64 and int(poisoned.poisoned.sum()) == 164
    assert torch.equal(poisoned.images[~poisoned.poisoned][:10], data.images[~poisoned.poisoned][:10])


def _cache_file() -> Path:
    (found,) = list(sources.cache_dir().glob("imagefolder-*.safetensors"))
    return found


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_truncated_or_corrupt_decode_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("CLEANSE_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "f")
    first = load_data(str(root))
    expected, labels, notes = first.images.clone(), first.labels.clone(), list(first.notes)
    del first  # the cache is damaged below: nothing may still map it
    gc.collect()
    cached = _cache_file()
    size = cached.stat().st_size
    with open(cached, "r+b") as fh:
        if damage == "truncate":
            fh.truncate(size - 100)
        else:
            fh.write(b"\xff" * 16)
    again = load_data(str(root))
    assert torch.equal(again.images, expected) and torch.equal(again.labels, labels) and again.notes == notes
    assert _cache_file().stat().st_size == size


def test_the_decode_cache_written_in_chunks_equals_decoding_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DECODE_CHUNK", 2)
    root = make_folder(tmp_path / "f")
    png(root / "dog" / "wide.png", size=(48, 20))
    in_memory = load_data(str(root), cache=False)
    cached = load_data(str(root))
    _same(cached, in_memory)
    assert cached.notes == in_memory.notes and len(cached) == 6
    back = load_data(str(root))  # now read from the cache
    _same(back, in_memory)
    assert back.notes == in_memory.notes


def test_chunked_resize_equals_one_shot():
    images = torch.randint(0, 256, (11, 20, 30, 3), generator=torch.Generator().manual_seed(0)).byte()
    for mode in ("resize", "center-crop"):
        assert torch.equal(fit_in_chunks(images, (16, 16), mode, chunk=3), fit_tensor(images, (16, 16), mode))
    # plain resize is what resize_dataset computed before it worked in chunks
    x = torch.nn.functional.interpolate(
        images.permute(0, 3, 1, 2).float() / 255, size=(16, 16), mode="bilinear", antialias=True, align_corners=False
    )
    old = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(fit_in_chunks(images, (16, 16), chunk=4), old)


def test_center_crop_takes_the_exact_centre_of_a_hand_made_image():
    image = (np.arange(8 * 16 * 3) % 251).astype(np.uint8).reshape(8, 16, 3)
    # target 7: cover floor(7 / 0.875) = 8 on the shorter side, so an 8x16 image is not scaled; the crop starts at
    # row round(0.5) = 0 and column round(4.5) = 4 (round half to even, as torchvision's CenterCrop)
    assert scaled_size(8, 16, (7, 7)) == (8, 16)
    expected = image[0:7, 4:11]
    assert np.array_equal(fit_array(image, (7, 7), "center-crop"), expected)
    assert np.array_equal(fit_tensor(torch.from_numpy(image)[None], (7, 7), "center-crop")[0].numpy(), expected)
    assert scaled_size(500, 375, (224, 224)) == (341, 256)  # torchvision Resize(256) then CenterCrop(224)


def test_center_crop_is_recorded_in_the_model_and_applied_to_its_data(tmp_path):
    model = new_model("cnn", 2, ["a", "b"], (3, 8, 8), arch_args={"width": "4,4,4"}, preprocess="center-crop")
    save_model(model, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.spec.preprocess == "center-crop" and RECORDED == PREPROCESSING
    with pytest.raises(CleanseError, match="--preprocess resize disagrees with the checkpoint's metadata"):
        load_model(tmp_path / "m.safetensors", ModelOptions(preprocess="resize"))
    assert new_model("cnn", 2, input_size=(3, 8, 8), arch_args={"width": "4,4,4"}).spec.preprocess == "resize"
    data = synthetic("test").subset(torch.arange(20))
    save_dataset(data, tmp_path / "d.safetensors")
    loaded = load_data(str(tmp_path / "d.safetensors"), image_size=(8, 8), preprocess=back.spec.preprocess)
    assert torch.equal(loaded.images, fit_tensor(data.images, (8, 8), "center-crop"))
    assert "resized and center-cropped to 8x8" in loaded.notes[-1]


def test_an_image_folder_is_center_cropped_when_asked(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    image = (np.arange(8 * 16 * 3) % 251).astype(np.uint8).reshape(8, 16, 3)
    Image.fromarray(image).save(root / "a" / "x.png")
    Image.fromarray(image).save(root / "b" / "y.png")
    data = load_data(str(root), image_size=(7, 7), preprocess="center-crop")
    assert torch.equal(data.images[0], torch.from_numpy(image[0:7, 4:11].copy()))
    plain = load_data(str(root), image_size=(7, 7))  # another cache entry: plain resize
    assert not torch.equal(plain.images[0], data.images[0])


@pytest.mark.parametrize("attack", ["badnets", "blended", "sig", "wanet"])
def test_poisoning_a_mapped_file_gives_todays_output_and_leaves_the_source_alone(tmp_path, attack):
    clean = synthetic("test")
    save_dataset(clean, tmp_path / "c.safetensors")
    mapped = load_dataset_file(tmp_path / "c.safetensors")
    target = 0
    out, trigger = poison_dataset(mapped, attack, target, 0.05, seed=4)
    again, _ = poison_dataset(clean, attack, target, 0.05, seed=4)
    _same(out, again)
    assert torch.equal(mapped.images, clean.images)  # the source is unchanged
    # today's one-shot algorithm: clone, then trigger every chosen row at once
    expected = clean.images.clone()
    chosen = out.poisoned.nonzero().flatten()
    expected[chosen] = trigger.apply_uint8(clean.images[chosen])
    rows = ~out.noise if out.noise is not None else torch.ones(len(clean), dtype=torch.bool)
    assert torch.equal(out.images[rows], expected[rows])


def test_evaluation_in_chunks_equals_one_triggered_set():
    data = synthetic("test")
    _, trigger = poison_dataset(data, "badnets", 0, 0.1, seed=0)
    model = new_model("cnn", 10, input_size=(3, 32, 32), arch_args={"width": "8,8,8"}, seed=0).eval()
    whole = TriggeredSet.build(data, trigger)
    tpreds, true, target = predict_triggered(model, data, trigger, chunk=37)
    assert torch.equal(tpreds, predict(model, whole.images))
    assert torch.equal(true, whole.true_labels) and torch.equal(target, whole.target_labels)
    assert evaluate(model, data, trigger) == evaluate(model, data, triggered=whole)
