"""The end of a sampling run (rank 0): the folder's grid, samples.npz and the combined timings.

Everything is read back from the PNGs on disk, so a resumed run, or one split over several
processes, ends with the same files as a single uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffusion.outputs import rows_by_label, save_grid, save_npz
from runs.generate import Generation
from runs.resume import SampleFolder


@dataclass
class RankResult:
    """What one process reports back (small: no images)."""
    num_generated: int
    sampling_seconds: float
    decode_seconds: float
    steps_per_model: list[int] | None

    @classmethod
    def of(cls, g: Generation) -> "RankResult":
        return cls(len(g.indices or []), g.sampling_seconds, g.decode_seconds, g.steps_per_model)


def combine(results: list[RankResult]) -> dict:
    """Timings of a run split over ranks: the ranks run side by side, so the run takes as long
    as the slowest; images/s counts the images this run generated."""
    generated = sum(r.num_generated for r in results)
    seconds = max(r.sampling_seconds for r in results)
    return {
        "num_generated": generated,
        "sampling_seconds": seconds,
        "decode_seconds": max(r.decode_seconds for r in results),
        "images_per_second": generated / seconds if seconds > 0 else 0.0,
        "world_size": len(results),
        "sampling_seconds_per_rank": [r.sampling_seconds for r in results],
    }


def first_steps(results: list[RankResult]) -> list[int] | None:
    return next((r.steps_per_model for r in results if r.steps_per_model is not None), None)


def write_folder_outputs(folder: SampleFolder, labels: np.ndarray, grid_by_label: bool, grid_max: int | None) -> int:
    """samples.npz from the first num_samples PNGs, grid.png from the first grid_max; returns N."""
    images = folder.read_images()
    labels = np.asarray(labels)[: len(images)]
    save_npz(images, labels, folder.dir / "samples.npz")
    n = len(images) if grid_max is None else min(len(images), int(grid_max))
    if grid_by_label:
        cells, ncols = rows_by_label(images[:n], labels[:n])
        save_grid(cells, folder.dir / "grid.png", ncols)
    else:
        save_grid(images[:n], folder.dir / "grid.png")
    return len(images)
