"""Data sources: ImageFolder (with its cache and damaged files), CIFAR batches, .npz, synthetic."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cleanse.data import load_data, make_synthetic, sources
from cleanse.errors import CleanseError


def png(path, size=(32, 32), mode="RGB", colour=(10, 20, 30)):
    Image.new(mode, size, colour if mode in ("RGB", "RGBA") else 128).save(path)


def make_folder(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    png(root / "cat" / "a.png")
    png(root / "cat" / "b.png", mode="L")
    png(root / "cat" / "c.png", mode="RGBA", colour=(1, 2, 3, 4))
    png(root / "dog" / "d.png", size=(64, 48))
    png(root / "dog" / "e.jpg")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("hello")
    return root


def test_image_folder_converts_resizes_skips_and_counts(tmp_path):
    data = load_data(str(make_folder(tmp_path / "f")), cache=False)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 32, 32, 3) and data.images.dtype == torch.uint8
    assert data.images[0, 0, 0].tolist() == [10, 20, 30]
    assert data.images[1, 0, 0].tolist() == [128, 128, 128]  # grayscale -> RGB
    assert data.images[2, 0, 0].tolist() == [1, 2, 3]  # RGBA -> RGB
    assert "skipped 1 non-image and 2 unreadable/corrupt/oversized files" in data.notes[0]
    assert any("resized 1 images" in n for n in data.notes)


def test_image_folder_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    first = load_data(str(root))
    monkeypatch.setattr(sources, "_decode", lambda path: pytest.fail("decoded although cached"))
    second = load_data(str(root))
    assert torch.equal(first.images, second.images) and second.notes == first.notes
    png(root / "cat" / "z.png")  # a new file changes the key: decoding happens again
    with pytest.raises(BaseException, match="decoded although cached"):
        load_data(str(root))


def test_a_model_sized_read_reuses_the_folder_read_at_its_own_size(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    native = load_data(str(root))  # poison and train read a folder at its own size, with no model
    caches = sorted(sources.cache_dir().glob("imagefolder-*.safetensors"))
    monkeypatch.setattr(sources, "_decode", lambda path: pytest.fail("decoded although cached"))
    fitted = load_data(str(root), image_size=(32, 32))  # unlearn or scan with a 32x32 model
    assert torch.equal(fitted.images, native.images) and fitted.notes == native.notes
    assert sorted(sources.cache_dir().glob("imagefolder-*.safetensors")) == caches  # no second cache file
    with pytest.raises(BaseException, match="decoded although cached"):
        load_data(str(root), image_size=(16, 16))  # another size is a different decode


def test_a_read_at_the_folders_own_size_reuses_an_earlier_model_sized_read(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    before = set(sources.cache_dir().glob("imagefolder-*.safetensors"))
    fitted = load_data(str(root), image_size=(32, 32))  # unlearn first, with a 32x32 model: the folder's own size
    caches = sorted(sources.cache_dir().glob("imagefolder-*.safetensors"))
    assert len(set(caches) - before) == 1
    monkeypatch.setattr(sources, "_decode", lambda path: pytest.fail("decoded although cached"))
    native = load_data(str(root))  # then poison, with no model
    assert torch.equal(native.images, fitted.images) and native.notes == fitted.notes
    assert sorted(sources.cache_dir().glob("imagefolder-*.safetensors")) == caches
    assert load_data(str(root), image_size=(32, 32)).images.shape == (5, 32, 32, 3)


def test_a_model_sized_read_at_another_size_keeps_its_own_cache(tmp_path):
    root = make_folder(tmp_path / "f")
    before = set(sources.cache_dir().glob("imagefolder-*.safetensors"))
    load_data(str(root), image_size=(16, 16))
    load_data(str(root))
    assert len(set(sources.cache_dir().glob("imagefolder-*.safetensors")) - before) == 2  # two different decodes


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "bomb"
    (root / "a").mkdir(parents=True)
    png(root / "a" / "ok.png")
    png(root / "a" / "big.png", size=(400, 400))
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 100_000)
    data = load_data(str(root), cache=False)
    assert len(data) == 1 and "1 unreadable/corrupt/oversized" in data.notes[0]


def test_folder_without_class_folders_or_images_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    png(tmp_path / "flat" / "x.png")
    with pytest.raises(CleanseError, match="not an ImageFolder"):
        load_data(str(tmp_path / "flat"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(CleanseError, match="no readable images"):
        load_data(str(tmp_path / "empty"))


def write_cifar(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"n{i}".encode() for i in range(10)]}, protocol=4)
    )


def test_cifar_batches_train_and_test_split(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    train = load_data(str(tmp_path), split="train")
    test = load_data(str(tmp_path / "cifar-10-batches-py"), split="test")
    assert len(train) == 30 and len(test) == 6 and train.classes[3] == "n3"
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert np.array_equal(test.images[1].numpy(), raw[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "c"
    write_cifar(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(CleanseError, match=r"refusing to unpickle (io|builtins)\.open"):
        load_data(str(folder), split="test")
    assert not marker.exists()


def test_npz_source_and_pickled_npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    data = load_data(str(tmp_path / "d.npz"))
    assert np.array_equal(data.images.numpy(), x) and data.classes == ["0", "1", "2"]
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.array([0]))
    with pytest.raises(CleanseError, match="pickled objects"):
        load_data(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32), y=np.zeros(5, dtype=int))
    with pytest.raises(CleanseError, match="'x' must be uint8"):
        load_data(str(tmp_path / "float.npz"))


def test_synthetic_is_deterministic_balanced_and_not_trivial():
    a, b = make_synthetic("train"), make_synthetic("train")
    assert torch.equal(a.images, b.images) and len(a) == 5000 and len(make_synthetic("test")) == 1000
    assert a.labels.bincount().tolist() == [500] * 10
    # colour alone does not give the class away: per-class mean colours are close together
    means = torch.stack([a.images[a.labels == c].float().mean((0, 1, 2)) for c in range(10)])
    assert (means.max(0).values - means.min(0).values).max() < 25
    with pytest.raises(CleanseError, match="unknown built-in dataset"):
        load_data("synthetic:val")


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(CleanseError, match="no such file or folder"):
        load_data(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CleanseError, match="unsupported data file type '.csv'"):
        load_data(str(tmp_path / "x.csv"))


def test_model_file_passed_as_data_is_refused(tmp_path):
    from cleanse.models import new_model, save_model

    save_model(new_model("cnn", 10, arch_args={"width": "4,4,4"}), tmp_path / "m.safetensors")
    with pytest.raises(CleanseError, match="this is a cleanse.model file, not a dataset"):
        load_data(str(tmp_path / "m.safetensors"))


def test_many_class_synthetic_set_is_balanced_deterministic_and_each_class_is_one_shape_and_hue():
    from cleanse.data.synthetic import CLASSES, make_many_classes

    data = make_many_classes(25, 110, size=32, seed=3, chunk=40)
    again = make_many_classes(25, 110, size=32, seed=3, chunk=40)
    assert torch.equal(data.images, again.images) and torch.equal(data.labels, again.labels)
    assert data.images.shape == (110, 32, 32, 3) and data.images.dtype == torch.uint8
    assert data.labels.bincount(minlength=25).tolist() == [5] * 10 + [4] * 15  # 110 = 4 x 25 + 10
    assert data.classes[0] == f"{CLASSES[0]}-0" and data.classes[24] == f"{CLASSES[4]}-2" and len(data.classes) == 25

    # classes 3 and 13 share a shape but not a hue: their shape pixels (far from the grey background) differ in colour
    def shape_colour(k: int) -> torch.Tensor:
        imgs = data.images[data.labels == k].float()
        far = (imgs - imgs.mean(3, keepdim=True)).abs().amax(3) > 60  # saturated pixels: the shape
        return imgs[far].mean(0)

    assert (shape_colour(3) - shape_colour(13)).abs().max() > 40
    with pytest.raises(ValueError, match="need at least 2 classes and one image per class"):
        make_many_classes(30, 20)
