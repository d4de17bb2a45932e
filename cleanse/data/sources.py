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
from cleanse.data.synthetic import make_synthetic
from cleanse.errors import CleanseError
from cleanse.files import read_safetensors, write_safetensors

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 50_000_000  # refuse decompression bombs well before Pillow's own limit
MAX_CLASSES = 100_000  # an .npz without class names gets one name per label up to the largest
CACHE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANSE_CACHE_DIR") or Path.home() / ".cache" / "cleanse")


def load_data(
    spec: str, *, split: str = "train", cache: bool = True, image_size: tuple[int, int] | None = None
) -> Dataset:
    """Load DATA as one uint8 tensor. `split` picks train/test for CIFAR batch folders."""
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
            dataset = _load_cifar_batches(batches, split) if batches else _load_image_folder(path, cache, image_size)
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
        dataset = resize_dataset(dataset, image_size)
    return dataset


def resize_dataset(dataset: Dataset, size: tuple[int, int]) -> Dataset:
    old = dataset.image_size
    images = torch.nn.functional.interpolate(
        dataset.chw_float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )
    dataset.images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    dataset.notes.append(
        f"{dataset.source}: images are {old[0]}x{old[1]}; resized to {size[0]}x{size[1]} to fit the model"
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


def _load_image_folder(root: Path, use_cache: bool, image_size: tuple[int, int] | None) -> Dataset:
    root = root.resolve()
    classes, files, non_images = _list_image_folder(root)
    key_doc = json.dumps([CACHE_VERSION, str(root), files, non_images, list(image_size) if image_size else None])
    key = hashlib.sha256(key_doc.encode()).hexdigest()[:32]
    cached = cache_dir() / f"imagefolder-{key}.safetensors"
    if use_cache and cached.is_file():
        try:
            tensors, metadata = read_safetensors(cached)
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
            pass  # a damaged cache entry is rebuilt below
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        arrays = list(pool.map(lambda f: _decode(root / f[0]), files, chunksize=256))
    ok = [(a, f[1]) for a, f in zip(arrays, files, strict=True) if a is not None]
    corrupt = len(files) - len(ok)
    notes = []
    if corrupt or non_images:
        notes.append(f"{root}: skipped {non_images} non-image and {corrupt} unreadable/corrupt/oversized files")
    if not ok:
        raise CleanseError(f"{root}: no readable images in the ImageFolder; check the files")
    empty = [c for i, c in enumerate(classes) if not any(lab == i for _, lab in ok)]
    if empty:
        notes.append(f"{root}: class folders with no readable images: {', '.join(empty[:5])}")
    sizes = Counter(a.shape[:2] for a, _ in ok)
    target = tuple(image_size) if image_size else sizes.most_common(1)[0][0]
    resized = 0
    images = np.empty((len(ok), target[0], target[1], 3), dtype=np.uint8)
    for i, (a, _) in enumerate(ok):
        if a.shape[:2] != target:
            a = np.asarray(Image.fromarray(a).resize((target[1], target[0]), Image.Resampling.BILINEAR))
            resized += 1
        images[i] = a
    if resized:
        notes.append(f"{root}: resized {resized} images of another size to {target[0]}x{target[1]}")
    labels = torch.tensor([lab for _, lab in ok], dtype=torch.int64)
    dataset = Dataset(torch.from_numpy(images), labels, classes, str(root), meta={"source": str(root)}, notes=notes)
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(
                cached, {"images": dataset.images, "labels": labels}, {"classes": classes, "notes": notes}
            )
        except OSError:
            pass  # an unwritable cache only costs speed
    return dataset


def load_image_files(paths: list[str], size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
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
            notes.append(f"{p}: {a.shape[0]}x{a.shape[1]} resized to {size[0]}x{size[1]}")
            a = np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        out.append(torch.from_numpy(a.copy()))
    return torch.stack(out), notes
