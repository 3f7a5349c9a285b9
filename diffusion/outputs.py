"""Run outputs, each written atomically (temporary name in the same folder, then rename).

A failure or a preempted job never leaves a half-written file under a final name. A write
that fails (full disk, read-only folder) is an OutputWriteError naming the file (the scripts
print it as one `error: ...` line); the file under its final name is left as it was.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ReportedError


class OutputWriteError(ReportedError):
    """An output file could not be written."""


@contextmanager
def _written_atomically(path: Path):
    """Yields a temporary path beside `path`; renamed to `path` when the block succeeds, removed otherwise."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        hint = ("the disk is full: free space, then run the same command again (it resumes)"
                if err.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you can write to")
        raise OutputWriteError(f"cannot write {path}: {err.strerror or err} ({hint})") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with _written_atomically(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_with(path: str | Path, write: Callable[[object], None]) -> Path:
    """write(f) into a binary file opened under a temporary name, then renamed to path."""
    path = Path(path)
    with _written_atomically(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample_filename(index: int) -> str:
    return f"{index:06d}.png"


def save_sample_pngs(images: np.ndarray, indices, out_dir: str | Path) -> None:
    """images (B, H, W, 3) uint8 -> out_dir/{global index:06d}.png."""
    for image, k in zip(images, indices, strict=False):
        atomic_write_bytes(Path(out_dir) / sample_filename(k), _png_bytes(image))


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) grid image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def rows_by_label(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Lay out one row per class (ascending), each row that class's samples in index order.

    Returns (cells, ncols) for image_grid: cells (rows * ncols, H, W, 3), short rows padded black.
    """
    classes = np.unique(labels)
    rows = [images[labels == c] for c in classes]
    ncols = max(len(r) for r in rows)
    blank = np.zeros((ncols, *images.shape[1:]), dtype=images.dtype)
    return np.concatenate([np.concatenate([r, blank[len(r):]]) for r in rows]), ncols


def save_grid(images: np.ndarray, path: str | Path, ncols: int | None = None) -> Path:
    return atomic_write_bytes(path, _png_bytes(image_grid(images, ncols)))


def save_npz(images: np.ndarray, labels: np.ndarray, path: str | Path) -> Path:
    """ADM evaluator layout: arr_0 (N, H, W, 3) uint8, arr_1 (N,) class labels.

    Streamed to the temporary file (no second copy in memory: 50K samples at 256px are 9.8 GB)."""
    return atomic_write_with(path, lambda f: np.savez(f, images, labels))


def npz_array_header(path: Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of `key` in an .npz, read from its header alone (None: missing or unreadable)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(shape), dtype
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def save_json(data: dict, path: str | Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
