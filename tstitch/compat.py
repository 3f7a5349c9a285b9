"""Refuse model lists that cannot share one trajectory, before any sampling."""
from __future__ import annotations

import torch.nn as nn

from diffusion.errors import UserError


def describe(model: nn.Module) -> dict:
    """What stitching needs to compare, read from a native DiT or a diffusers model config."""
    config = getattr(model, "config", None)
    # diffusers models: read their config (attribute access to config keys is deprecated there)
    get = (lambda k: getattr(model, k, None)) if config is None else \
        (lambda k: config[k] if k in config else getattr(model, k, None))
    in_channels = get("in_channels")
    size = get("input_size") or get("sample_size")
    out_channels = get("out_channels")
    learn_sigma = get("learn_sigma")
    if learn_sigma is None and in_channels and out_channels:
        learn_sigma = out_channels == 2 * in_channels
    num_classes = get("num_classes")
    if num_classes is None:
        num_classes = get("num_embeds_ada_norm")
    return {"in_channels": in_channels, "latent_size": size, "num_classes": num_classes, "learn_sigma": learn_sigma}


def check_stitchable(models, names, learned_variance_solver: bool) -> None:
    """Raise ValueError naming the first property the models disagree on.

    Under DDPM with learned variance the variance comes from whichever model runs the
    step, so every model must predict it; other solvers use eps only.
    """
    info = [describe(m) for m in models]
    keys = ["in_channels", "latent_size", "num_classes"] + (["learn_sigma"] if learned_variance_solver else [])
    for key in keys:
        values = {n: d[key] for n, d in zip(names, info, strict=True)}
        if len({v for v in values.values() if v is not None}) > 1:
            what = {"in_channels": "latent channel counts", "latent_size": "latent sizes",
                    "num_classes": "class counts", "learn_sigma": "learned-variance outputs under DDPM"}[key]
            hint = " (use sampler=ddim, dpmpp_2m or euler, which use eps only)" if key == "learn_sigma" else ""
            raise UserError(f"these models cannot be stitched: different {what}: {values}{hint}")
