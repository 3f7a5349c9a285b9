"""diffusers' caches (FirstBlockCache, TaylorSeer, MagCache, FasterCache, PAB, SeaCache) as techniques.

Built on diffusers' own hooks (diffusers.hooks.apply_*); this package adds what diffusers leaves to
the caller (caches.harness: state reset per trajectory, cache contexts per CFG branch, the current
step), makes our DiT findable by diffusers' registries (caches.registry), counts the work really done
(caches.accounting) and keeps MagCache's calibration files (caches.mag_calibration).
"""
from .harness import CacheHook
from .techniques import FasterCacheHook, FirstBlockCacheHook, MagCacheHook, PABHook, SeaCacheHook, TaylorSeerHook

__all__ = ["CacheHook", "FasterCacheHook", "FirstBlockCacheHook", "MagCacheHook", "PABHook", "SeaCacheHook",
           "TaylorSeerHook"]
