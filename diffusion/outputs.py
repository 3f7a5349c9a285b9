"""Run outputs, each written atomically (temporary name in the same folder, then rename).

A failure or a preempted job never leaves a half-written file under a final name.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample_filename(index: int) -> str:
    return f"{index:06d}.png"


def save_sample_pngs(images: np.ndarray, indices, out_dir: str | Path) -> None:
    """images (B, H, W, 3) uint8 -> out_dir/{global index:06d}.png."""
    for image, k in zip(images, indices):
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, images, labels)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_json(data: dict, path: str | Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
