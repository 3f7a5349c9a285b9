"""Wall-clock time of one sampling run, for the benchmarks (GPU work is synchronised)."""
from __future__ import annotations

import time

import torch

from .sampler import sample
from .seeding import initial_noise, sample_generators


def time_sampling(models, solver, hooks, *, latent_shape, batch_size, cfg_scale, null_label, device) -> float:
    """Seconds for one `sample` call of `batch_size` class-0 samples (seeds 0..B-1), nothing else."""
    gens = sample_generators(0, range(batch_size), device)
    noise = initial_noise(gens, latent_shape, device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sample(models, solver, noise, {"y": y}, {"y": torch.full_like(y, null_label)}, cfg_scale=cfg_scale,
           hooks=hooks, generators=gens, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
