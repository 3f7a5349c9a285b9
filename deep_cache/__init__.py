"""DeepCache (Ma et al. 2024): reuse the deep U-Net features between steps.

- `DeepCacheHook`: a sampler hook for the native LDM U-Net (and diffusers U-Nets in our loop,
  e.g. when scripts/count_macs.py counts them);
- `apply_deep_cache(pipe, ...)`: on a diffusers U-Net pipeline (SD 1.x/2.x, SD-XL, stitched ones).
"""
from .hook import DeepCacheHook, attach_feature_cache, detach_feature_cache, find_unet
from .pipelines import DeepCache, apply_deep_cache, deep_cache_of, remove_deep_cache
from .unet2d import allowed_branch_ids, find_diffusers_unets

__all__ = ["DeepCache", "DeepCacheHook", "allowed_branch_ids", "apply_deep_cache", "attach_feature_cache",
           "deep_cache_of", "detach_feature_cache", "find_diffusers_unets", "find_unet", "remove_deep_cache"]
