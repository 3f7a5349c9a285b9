"""One signal between techniques that share a model: "recompute every cached feature at the next call".

T-GATE changes what a forward computes at its gate (the cross-attention cache is filled one
step before, the CFG batch ends at the gate), so a cache of deeper features kept by another
technique (DeepCache) must restart there, as tgate's DeepCache loaders restart DeepCache's
helper. Neither technique imports the other:

- in the sampler loop, a hook sets `StepContext.refresh_features` for the step;
- on a diffusers pipeline (no StepContext), a module hook that keeps such a cache has a
  `refresh_features()` method, and `refresh_feature_caches(module)` calls it on every hook
  registered (diffusers `HookRegistry`) on `module` or inside it.
"""
from __future__ import annotations

import torch.nn as nn


def refresh_feature_caches(module: nn.Module) -> int:
    """Ask every feature cache hooked inside `module` to recompute at its next call; returns how many."""
    count = 0
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in list(registry.hooks.values()):
            refresh = getattr(hook, "refresh_features", None)
            if callable(refresh):
                refresh()
                count += 1
    return count
