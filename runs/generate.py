"""Many samples in batches: per-sample seeds and labels, timing, decoding, PNGs as they come."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.context import Hook
from diffusion.errors import UserError
from diffusion.finite import check_finite_latents
from diffusion.outputs import save_sample_pngs
from diffusion.sampler import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import Solver


@dataclass
class Generation:
    images: np.ndarray  # (N, H, W, 3) uint8, N = the samples generated (empty with keep_images=False)
    labels: np.ndarray  # (N,) int64
    sampling_seconds: float  # the sampling loops alone (no loading, no decoding)
    decode_seconds: float
    steps_per_model: list[int] | None  # steps of one trajectory run by each denoiser (None: no batch ran)
    evals_per_model: list[int] | None  # forward rows per image run by each denoiser (guided steps count 2)
    indices: list[int] | None = None  # the sample indices generated, in order


def check_counts(num_samples, batch_size) -> None:
    for key, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: must be an integer >= 1")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    denoisers: Callable | Sequence[Callable],
    solver: Solver,
    decode: Callable[[torch.Tensor], np.ndarray],
    *,
    latent_shape: tuple[int, int, int],
    labels: torch.Tensor,
    null_label: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    hooks: Sequence[Hook] = (),
    cond_key: str = "y",
    out_dir: str | Path | None = None,
    progress: bool = True,
    batches: Sequence[Sequence[int]] | None = None,
    keep_images: bool = True,
    model_dtype: torch.dtype | None = None,
    model_names: Sequence[str] = (),
) -> Generation:
    """Sample len(labels) images; sample k gets seed + k and labels[k] whatever the batching.

    decode: (B, C, h, w) latents -> (B, H, W, 3) uint8. With out_dir, each batch's
    PNGs are written as soon as it is decoded.
    batches: the sample indices to generate, one list per batch (default: all of them in
    batches of batch_size); a resumed or distributed run passes the ones it owns.
    keep_images=False keeps no image in memory (they are on disk): for large runs.
    model_dtype: the denoisers' type (precision bf16/fp16); the latents stay float32 (diffusion.sample).
    A batch whose latents hold NaN or inf after its last step stops the run before it is
    decoded or written (diffusion.finite; model_names name the models in the message).
    """
    num_samples = len(labels)
    check_counts(num_samples, batch_size)
    if batches is None:
        batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
    images, sampling_seconds, decode_seconds, result, done = [], 0.0, 0.0, None, []
    for indices in tqdm(batches, desc="batches", disable=not progress or len(batches) <= 1):
        indices = [int(k) for k in indices]
        generators = sample_generators(seed, indices, device)
        noise = initial_noise(generators, latent_shape, device)
        y = labels[indices].to(device)
        _synchronize(device)
        t0 = time.perf_counter()
        result = sample(
            denoisers, solver, noise, {cond_key: y}, {cond_key: torch.full_like(y, null_label)},
            cfg_scale=cfg_scale, guided_channels=guided_channels, hooks=hooks,
            generators=generators, progress=progress, model_dtype=model_dtype,
        )
        _synchronize(device)
        t1 = time.perf_counter()
        check_finite_latents(result.latents, indices, model_names)
        batch_images = decode(result.latents)
        t2 = time.perf_counter()
        sampling_seconds += t1 - t0
        decode_seconds += t2 - t1
        if keep_images:
            images.append(batch_images)
        done += indices
        if out_dir is not None:
            save_sample_pngs(batch_images, indices, out_dir)
    # every batch runs the same schedule, so the last one's counts stand for all
    stacked = np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    return Generation(stacked, labels[done].numpy() if keep_images else labels[:0].numpy(),
                      sampling_seconds, decode_seconds,
                      result.steps_per_model if result else None, result.evals_per_model if result else None, done)
