"""DATA arguments: ImageFolder, CIFAR-10 python batches, .npz, dataset .safetensors, `synthetic`."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cleanse.data.dataset import Dataset, load_dataset_file
from cleanse.data.preprocess import check_preprocess, fit_array, fit_in_chunks
from cleanse.data.store import RowArray, RowFile
from cleanse.data.synthetic import make_synthetic
from cleanse.errors import CleanseError
from cleanse.files import atomic_path, folder_writable, read_safetensors_mapped

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 50_000_000  # refuse decompression bombs well before Pillow's own limit
MAX_CLASSES = 100_000  # an .npz without class names gets one name per label up to the largest
CACHE_VERSION = 1
DECODE_CHUNK = 256  # images decoded (and held) at once


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANSE_CACHE_DIR") or Path.home() / ".cache" / "cleanse")


def load_data(
    spec: str,
    *,
    split: str = "train",
    cache: bool = True,
    image_size: tuple[int, int] | None = None,
    preprocess: str = "resize",
) -> Dataset:
    """Load DATA as one uint8 tensor (memory-mapped for dataset files and ImageFolders read through the cache).
    `split` picks train/test for CIFAR batch folders; images not of `image_size` are fitted to it by `preprocess`
    (`resize` or `center-crop`, see cleanse/data/preprocess.py)."""
    check_preprocess(preprocess)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        name, _, part = spec.partition(":")
        part = part or "train"
        if name != "synthetic" or part not in ("train", "test"):
            raise CleanseError(f"unknown built-in dataset {spec!r}; use 'synthetic' or 'synthetic:test'")
        dataset = make_synthetic(part)
    else:
        path = Path(spec)
        if not path.exists():
            raise CleanseError(
                f"{spec}: no such file or folder; "
                "pass an ImageFolder, a CIFAR batch folder, an .npz, a dataset .safetensors or 'synthetic'"
            )
        if path.is_dir():
            batches = _find_cifar_batches(path)
            dataset = (
                _load_cifar_batches(batches, split)
                if batches
                else _load_image_folder(path, cache, image_size, preprocess)
            )
        elif path.suffix == ".npz":
            dataset = _load_npz(path)
        elif path.suffix == ".safetensors":
            dataset = load_dataset_file(path)
        else:
            raise CleanseError(
                f"{spec}: unsupported data file type {path.suffix!r}; pass a folder, an .npz or a dataset .safetensors"
            )
    if len(dataset) == 0:
        raise CleanseError(f"{spec}: the dataset holds no images; check the path")
    if image_size is not None and dataset.image_size != tuple(image_size):
        dataset = resize_dataset(dataset, image_size, preprocess)
    return dataset


def resize_dataset(dataset: Dataset, size: tuple[int, int], preprocess: str = "resize") -> Dataset:
    """Fit every image to `size` (a chunk at a time, so only the uint8 result is held whole)."""
    old = dataset.image_size
    dataset.images = fit_in_chunks(dataset.images, (size[0], size[1]), preprocess)
    how = "resized" if preprocess == "resize" else "resized and center-cropped"
    dataset.notes.append(
        f"{dataset.source}: images are {old[0]}x{old[1]}; {how} to {size[0]}x{size[1]} to fit the model"
    )
    return dataset


# --- CIFAR-10 python batches -------------------------------------------------


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admit only numpy's array reconstruction; any other global is refused."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            from numpy._core import multiarray

            return getattr(multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise CleanseError(
            f"refusing to unpickle {module}.{name}: a CIFAR batch may hold only numpy arrays; "
            "the file is not a genuine CIFAR batch"
        )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except CleanseError as exc:
        raise CleanseError(f"{path}: {exc.message}") from None
    except Exception as exc:
        raise CleanseError(
            f"{path}: not a readable CIFAR python batch ({type(exc).__name__}); re-extract cifar-10-python.tar.gz"
        ) from None
    if not isinstance(obj, dict):
        raise CleanseError(f"{path}: a CIFAR batch must hold a dict; re-extract cifar-10-python.tar.gz")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find_cifar_batches(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return None


def _load_cifar_batches(folder: Path, split: str) -> Dataset:
    if split not in ("train", "test"):
        raise CleanseError(f"--split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CleanseError(
            f"{folder}: CIFAR batch folder lacks {', '.join(missing)}; re-extract it or choose the other --split"
        )
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        data, lab = batch.get("data"), batch.get("labels")
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
            or not isinstance(lab, list)
        ):
            raise CleanseError(
                f"{folder / name}: not a CIFAR-10 batch (expected uint8 data of shape (N, 3072) and a label list)"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()))
        labels.append(torch.tensor(lab, dtype=torch.int64))
    classes = [f"class_{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        names_ = meta.get("label_names")
        if isinstance(names_, list) and names_:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
    return Dataset(torch.cat(images), torch.cat(labels), classes, str(folder), meta={"source": f"{folder}:{split}"})


# --- .npz ------------------------------------------------------------------


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as exc:
        raise CleanseError(
            f"{path}: .npz holds pickled objects, which cleanse never loads ({exc}); save plain arrays"
        ) from None
    except Exception as exc:
        raise CleanseError(f"{path}: not a readable .npz ({type(exc).__name__}); save it with numpy.savez") from None
    if "x" not in arrays or "y" not in arrays:
        raise CleanseError(f"{path}: .npz must hold 'x' (uint8 N,H,W,C) and 'y' (N,) arrays; found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise CleanseError(
            f"{path}: 'x' must be uint8 (N,H,W,C), got {x.dtype} {x.shape}; "
            "convert with (x*255).round().astype('uint8')"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise CleanseError(f"{path}: 'x' must have 1 or 3 channels last (N,H,W,C), got shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise CleanseError(f"{path}: 'y' must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
    if len(y) and (int(y.max()) >= MAX_CLASSES or int(y.min()) < 0):
        bad = int(y.max()) if int(y.max()) >= MAX_CLASSES else int(y.min())
        raise CleanseError(
            f"{path}: 'y' holds label {bad}; labels must be class indices 0..C-1 (at most {MAX_CLASSES} classes)"
        )
    if "classes" in arrays:
        classes = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1).tolist()]
    else:
        classes = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    return Dataset(
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(y.astype(np.int64)),
        classes,
        str(path),
        meta={"source": str(path)},
    )


# --- ImageFolder -----------------------------------------------------------


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int, int, int]], int]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise CleanseError(
            f"{root}: not an ImageFolder (no class sub-folders) and not a CIFAR batch folder; "
            "lay images out as ROOT/<class>/<image>"
        )
    files, non_images = [], 0
    for index, name in enumerate(classes):
        for entry in sorted(os.scandir(root / name), key=lambda e: e.name):
            if not entry.is_file() or entry.name.startswith("."):
                continue
            if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                non_images += 1
                continue
            st = entry.stat()
            files.append((f"{name}/{entry.name}", index, st.st_size, st.st_mtime_ns))
    return classes, files, non_images


def _decode(path: Path) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return None
                return np.asarray(im.convert("RGB"))
    except Exception:  # corrupt, zero-byte, truncated, bombs: skipped and counted
        return None


def _probe(path: Path) -> tuple[int, int] | None:
    """(height, width) from the image's header alone, or None for a file `_decode` would refuse by its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Exception:
        return None
    return None if width * height > MAX_IMAGE_PIXELS else (height, width)


def _decode_fitted(path: Path, size: tuple[int, int], preprocess: str) -> tuple[np.ndarray | None, bool]:
    """The decoded image fitted to `size`, and whether it had to be."""
    a = _decode(path)
    if a is None or a.shape[:2] == size:
        return a, False
    return fit_array(a, size, preprocess), True


def _folder_notes(
    root: Path, non_images: int, corrupt: int, empty: list[str], fitted: int, size: tuple[int, int], preprocess: str
) -> list[str]:
    notes = []
    if corrupt or non_images:
        notes.append(f"{root}: skipped {non_images} non-image and {corrupt} unreadable/corrupt/oversized files")
    if empty:
        notes.append(f"{root}: class folders with no readable images: {', '.join(empty[:5])}")
    if fitted:
        how = "resized" if preprocess == "resize" else "resized and center-cropped"
        notes.append(f"{root}: {how} {fitted} images of another size to {size[0]}x{size[1]}")
    return notes


def _read_cache(cached: Path, root: Path) -> Dataset | None:
    try:
        tensors, metadata = read_safetensors_mapped(cached, ("images",))
        doc = json.loads(metadata["cleanse"])
        return Dataset(
            tensors["images"],
            tensors["labels"],
            doc["classes"],
            str(root),
            meta={"source": str(root)},
            notes=doc["notes"],
        )
    except (CleanseError, KeyError, ValueError, TypeError):
        return None  # a damaged cache entry is rebuilt


def _cache_file(root: Path, files: list, non_images: int, image_size: tuple[int, int] | None, preprocess: str) -> Path:
    """The decode cache of an ImageFolder listing, read at `image_size` (None: its own) with `preprocess`."""
    key_parts: list = [CACHE_VERSION, str(root), files, non_images, list(image_size) if image_size else None]
    if preprocess != "resize":  # today's keys stay valid for plain resizing
        key_parts.append(preprocess)
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
    return cache_dir() / f"imagefolder-{key}.safetensors"


def _load_image_folder(
    root: Path, use_cache: bool, image_size: tuple[int, int] | None, preprocess: str = "resize"
) -> Dataset:
    root = root.resolve()
    classes, files, non_images = _list_image_folder(root)
    cached = _cache_file(root, files, non_images, image_size, preprocess)
    if use_cache and cached.is_file():
        dataset = _read_cache(cached, root)
        if dataset is not None:
            return dataset
    native = _cache_file(root, files, non_images, None, "resize")
    if use_cache and image_size and preprocess == "resize":
        # The folder read at its own size (by poison or train, with no model) fits a model of that size as it is:
        # the same decode, so the cache is reused instead of decoding the folder into a second file.
        dataset = _read_cache(native, root) if native.is_file() else None
        if dataset is not None and dataset.image_size == tuple(image_size):
            return dataset
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        sizes = list(pool.map(lambda f: _probe(root / f[0]), files, chunksize=256))
        readable = [f for f, size in zip(files, sizes, strict=True) if size is not None]
        if not readable:
            raise CleanseError(f"{root}: no readable images in the ImageFolder; check the files")
        own = Counter(s for s in sizes if s is not None).most_common(1)[0][0]
        target = (int(image_size[0]), int(image_size[1])) if image_size else (int(own[0]), int(own[1]))
        if preprocess == "resize" and target == tuple(own):
            # A model-sized read at the folder's own size decodes exactly what the own-size read does: it writes
            # that cache, so a later read without a model (poison, train) finds it too.
            cached = native
        folder = _Folder(root, classes, len(files), non_images, readable, target, preprocess)
        if use_cache and folder_writable(cached.parent):
            _decode_to_cache(folder, pool, cached)
            dataset = _read_cache(cached, root)
            if dataset is None:
                raise CleanseError(f"{cached}: the decode cache just written cannot be read back; pass --no-cache")
            return dataset
        rows = RowArray(len(readable), (*target, 3))  # no cache: the images are held in memory
        labels, notes = folder.decode(pool, rows)
        return Dataset(rows.images(), labels, classes, str(root), meta={"source": str(root)}, notes=notes)


class _Folder:
    """What decoding an ImageFolder needs: its files that opened, the common size and how to fit the others."""

    def __init__(
        self,
        root: Path,
        classes: list[str],
        listed: int,
        non_images: int,
        readable: list[tuple[str, int, int, int]],
        size: tuple[int, int],
        preprocess: str,
    ) -> None:
        self.root, self.classes, self.listed, self.non_images = root, classes, listed, non_images
        self.readable, self.size, self.preprocess = readable, size, preprocess

    def largest_doc(self) -> dict:
        """A cache document at least as long as any this folder can give: it sizes the room kept for the header."""
        longest = sorted(self.classes, key=lambda c: len(json.dumps(json.dumps(c))))[-5:]
        notes = _folder_notes(self.root, self.non_images, self.listed, longest, self.listed, self.size, "center-crop")
        return {"classes": self.classes, "notes": notes}

    def decode(self, pool: ThreadPoolExecutor, rows: RowFile | RowArray) -> tuple[torch.Tensor, list[str]]:
        """Decode a chunk at a time into `rows`; the labels of the rows written and the notes."""
        labels: list[int] = []
        fitted = 0
        for start in range(0, len(self.readable), DECODE_CHUNK):
            chunk = self.readable[start : start + DECODE_CHUNK]
            decoded = list(pool.map(lambda f: _decode_fitted(self.root / f[0], self.size, self.preprocess), chunk))
            good = [(a, f[1]) for (a, _), f in zip(decoded, chunk, strict=True) if a is not None]
            fitted += sum(was for a, was in decoded if a is not None)
            if good:
                rows.append(np.stack([a for a, _ in good]))
                labels.extend(label for _, label in good)
        if not labels:
            raise CleanseError(f"{self.root}: no readable images in the ImageFolder; check the files")
        present = set(labels)
        empty = [c for i, c in enumerate(self.classes) if i not in present]
        corrupt = self.listed - len(labels)
        notes = _folder_notes(self.root, self.non_images, corrupt, empty, fitted, self.size, self.preprocess)
        return torch.tensor(labels, dtype=torch.int64), notes


def _decode_to_cache(folder: _Folder, pool: ThreadPoolExecutor, cached: Path) -> None:
    """Decode into a new cache file, renamed into place only when complete."""
    with atomic_path(cached) as tmp, open(tmp, "wb") as fh:
        try:
            rows = RowFile(fh, len(folder.readable), (*folder.size, 3), folder.largest_doc())
            labels, notes = folder.decode(pool, rows)
            rows.finish(labels, {"classes": folder.classes, "notes": notes})
        except OSError as exc:
            raise CleanseError(
                f"{cached}: cannot write the ImageFolder decode cache ({exc.strerror or type(exc).__name__}); "
                "free some space, set CLEANSE_CACHE_DIR to another folder, or pass --no-cache"
            ) from None


def load_image_files(
    paths: list[str], size: tuple[int, int], preprocess: str = "resize"
) -> tuple[torch.Tensor, list[str]]:
    """Decode individual image files (for `explain IMAGE...`), resized to the model's input."""
    out, notes = [], []
    for p in paths:
        if not Path(p).is_file():
            raise CleanseError(f"{p}: no such image file; check the path")
        a = _decode(Path(p))
        if a is None:
            raise CleanseError(
                f"{p}: cannot decode this image (empty, corrupt, or over {MAX_IMAGE_PIXELS:,} pixels); "
                "pass a PNG or JPEG file"
            )
        if a.shape[:2] != tuple(size):
            how = "resized" if preprocess == "resize" else "resized and center-cropped"
            notes.append(f"{p}: {a.shape[0]}x{a.shape[1]} {how} to {size[0]}x{size[1]}")
            a = fit_array(a, (size[0], size[1]), preprocess)
        out.append(torch.from_numpy(a.copy()))
    return torch.stack(out), notes
