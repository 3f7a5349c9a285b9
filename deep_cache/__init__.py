"""DeepCache (Ma et al. 2024) on the native LDM U-Net: reuse the deep U-Net features between steps."""
from .hook import DeepCacheHook, apply_deep_cache, find_unet, remove_deep_cache

__all__ = ["DeepCacheHook", "apply_deep_cache", "find_unet", "remove_deep_cache"]
