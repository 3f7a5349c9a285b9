"""NaN and inf: in weights (before they are loaded) and in sampled latents (once per batch).

A batch's latents are checked once, after its last step: one host sync per batch (the decode that
follows syncs anyway), none per step. A non-finite sample stops the run before its batch is
decoded or written, so the folder never holds a black image nor a `done` marker over one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ReportedError


class NonFiniteSamplesError(ReportedError):
    """Samples whose latents hold NaN or inf after the last step."""


def _tensors(obj, prefix: str = ""):
    """(name, tensor) of every tensor in nested dicts / lists / tuples, in order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def first_nonfinite(obj) -> tuple[str, int, int, str] | None:
    """(name, non-finite count, numel, "NaN"/"inf"/"NaN and inf") of the first float tensor in obj
    holding a non-finite value, or None."""
    for name, t in _tensors(obj):
        if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
            continue
        nan, count = int(torch.isnan(t).sum()), int((~torch.isfinite(t)).sum())
        kinds = "NaN" if nan == count else "inf" if nan == 0 else "NaN and inf"
        return name, count, t.numel(), kinds
    return None


def check_finite_latents(latents: torch.Tensor, indices: Sequence[int], model_names: Sequence[str] = ()) -> None:
    """latents (B, C, h, w) of the samples `indices`: raise NonFiniteSamplesError naming the
    samples whose latents hold NaN or inf, and the models that made them."""
    finite = torch.isfinite(latents).flatten(1).all(dim=1)  # (B,)
    if bool(finite.all()):  # the one host sync of the batch
        return
    bad = [int(indices[i]) for i in (~finite).nonzero().flatten().tolist()]
    models = " -> ".join(model_names) if model_names else "the denoiser"
    raise NonFiniteSamplesError(
        f"samples {bad} came out NaN/inf after the last step (models: {models}); nothing of their batch was "
        "written and the folder is not marked done. Check the weights and the settings (e.g. precision, cfg_scale)")
