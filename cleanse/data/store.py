"""A dataset file written row by row: uint8 images of one shape and their int64 labels, header last.

The ImageFolder decode cache is built with it, so decoding a folder larger than memory holds one chunk of decoded
images at a time. The safetensors header must come first in the file but is known only at the end (how many images
decoded, the notes): room for it is kept at the start, sized for the largest header this file could need, and the
final header is padded with spaces (which the format allows) to fill it exactly.
"""

from __future__ import annotations

import json
from typing import BinaryIO

import numpy as np
import torch

from cleanse.files import METADATA_KEY, safetensors_header, write_tensor_bytes


def cache_metadata(doc: dict) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(doc, sort_keys=True)}


def _entries(count: int, row_shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, list[int]]]:
    return [("images", torch.uint8, [count, *row_shape]), ("labels", torch.int64, [count])]


class RowFile:
    """Images appended in blocks of rows to an open file; `finish` adds the labels and the header."""

    def __init__(self, fh: BinaryIO, capacity: int, row_shape: tuple[int, ...], largest: dict) -> None:
        """`capacity`: the most rows that will be appended; `largest`: a metadata document at least as long as the
        final one (its JSON), which sizes the room kept for the header."""
        self.fh, self.row_shape, self.count = fh, row_shape, 0
        self.row_bytes = int(np.prod(row_shape))
        self.room = len(safetensors_header(_entries(capacity, row_shape), cache_metadata(largest))) + 64
        fh.seek(self.room)

    def append(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows, dtype=np.uint8).data)
        self.count += len(rows)

    def finish(self, labels: torch.Tensor, doc: dict) -> None:
        write_tensor_bytes(self.fh, labels.to(torch.int64))
        self.fh.truncate()
        self.fh.seek(0)
        self.fh.write(safetensors_header(_entries(self.count, self.row_shape), cache_metadata(doc), self.room))
        self.fh.flush()


class RowArray:
    """The same interface over an array in memory (no cache, or the cache folder cannot be written)."""

    def __init__(self, capacity: int, row_shape: tuple[int, ...]) -> None:
        self.rows = np.empty((capacity, *row_shape), dtype=np.uint8)
        self.count = 0

    def append(self, rows: np.ndarray) -> None:
        self.rows[self.count : self.count + len(rows)] = rows
        self.count += len(rows)

    def images(self) -> torch.Tensor:
        return torch.from_numpy(self.rows[: self.count])
