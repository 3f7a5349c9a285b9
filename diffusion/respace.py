"""ADM timestep respacing, the timestep sets DiT's published numbers were sampled with.

DiT (and T-Stitch's DiT experiments) sample with `create_diffusion("N")`, which keeps
the training-time steps chosen by `space_timesteps(1000, "N")` and rebuilds the betas
of the shorter chain from the kept cumulative alphas. DDPM's learned variance and
DDIM's update both depend on those rebuilt betas, so the sampler builds diffusers
schedulers over the respaced chain instead of handing them a non-uniform timestep set
(`DDIMScheduler.step` would assume an even stride and use the wrong alpha).
"""
from __future__ import annotations

import numpy as np

from diffusion.errors import UserError


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Training-time steps kept when sampling with fewer steps (sorted ascending).

    section_counts: "N" (or N, or a list of counts) splits [0, num_timesteps) into equal
    sections and takes that many steps from each, evenly spaced with rounded fractional
    strides (Python's round, ties to even, as ADM). "ddimN" takes the even integer
    stride DDIM papers use instead (N must divide into num_timesteps exactly).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        wanted = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise UserError(f"cannot take exactly {wanted} steps with an integer stride from {num_timesteps}")
    if isinstance(section_counts, str):
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = list(section_counts)

    per_section, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = per_section + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise UserError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated as a float, exactly as ADM does, before rounding
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respaced_betas(betas: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of the shorter chain through `kept`: 1 - abar[t_k] / abar[t_{k-1}] (float64)."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    new_betas = []
    last = 1.0
    for t in kept:
        new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.asarray(new_betas, dtype=np.float64)
