"""Wall-clock time of one sampling run, for the benchmarks (GPU work is synchronised)."""
from __future__ import annotations

import statistics
import time

import torch

from .sampler import sample
from .seeding import initial_noise, sample_generators

CPU = torch.device("cpu")  # the default device of the timing functions


def time_sampling(models, solver, hooks, *, latent_shape, batch_size, cfg_scale, null_label, device,
                  model_dtype=None) -> float:
    """Seconds for one `sample` call of `batch_size` class-0 samples (seeds 0..B-1), nothing else.
    model_dtype: the models' type (precision bf16/fp16), see diffusion.sample."""
    gens = sample_generators(0, range(batch_size), device)
    noise = initial_noise(gens, latent_shape, device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sample(models, solver, noise, {"y": y}, {"y": torch.full_like(y, null_label)}, cfg_scale=cfg_scale,
           hooks=hooks, generators=gens, progress=False, model_dtype=model_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_with_and_without(models, solver, hook, *, latent_shape, batch_size=1, cfg_scale=4.0, null_label=1000,
                          repeats=3, warmup=1, device=CPU, model_dtype=None) -> dict:
    """Median sampling time without and with `hook` (attached to `models` only for its runs),
    timed alternately so that drift on a noisy machine hits both. Returns
    {"baseline": s, "hooked": s, "runs": {...}}."""
    runs = {"baseline": [], "hooked": []}
    names = [f"model{k}" for k in range(len(models))]
    for k in range(warmup + repeats):
        for key in runs:
            if key == "hooked":
                hook.attach(models, names, solver)
            try:
                seconds = time_sampling(models, solver, [hook] if key == "hooked" else [], latent_shape=latent_shape,
                                        batch_size=batch_size, cfg_scale=cfg_scale, null_label=null_label,
                                        device=device, model_dtype=model_dtype)
            finally:
                if key == "hooked":
                    hook.detach()
            if k >= warmup:
                runs[key].append(seconds)
    return {key: statistics.median(times) for key, times in runs.items()} | {"runs": runs}
