"""Per-sample randomness: sample k uses only its own seed, seed + k.

That makes every image independent of the batch size and, later, of the number of
processes a run is split over.
"""
from __future__ import annotations

import numpy as np
import torch

from diffusion.errors import UserError


def sample_generators(seed: int, indices, device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample index k, seeded seed + k, on `device`."""
    return [torch.Generator(device=device).manual_seed(int(seed) + int(k)) for k in indices]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device,
                  dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) standard normal noise, row k drawn from generators[k]."""
    rows = [torch.randn((1, *shape), generator=g, device=device, dtype=dtype) for g in generators]
    return torch.cat(rows)


def class_labels(seed: int, num_samples: int, num_classes: int, labels=None) -> torch.Tensor:
    """(num_samples,) int64 class labels.

    labels: a list used cyclically (sample k gets labels[k % len]), or None for random
    classes: label k comes from its own numpy stream keyed (seed, k), apart from the
    noise streams, so it too does not depend on how samples are batched.
    """
    if labels is None:
        drawn = [np.random.default_rng([int(seed), int(k)]).integers(num_classes) for k in range(num_samples)]
        return torch.tensor(drawn, dtype=torch.long)
    labels = [int(v) for v in labels]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not labels or bad:
        raise UserError(f"labels={labels}: each must be a class index in [0, {num_classes - 1}]")
    return torch.tensor([labels[k % len(labels)] for k in range(num_samples)], dtype=torch.long)
