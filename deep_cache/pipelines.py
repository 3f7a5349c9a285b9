"""DeepCache on a stock diffusers pipeline call (SD 1.x/2.x, SD-XL, their img2img / ControlNet ...).

`apply_deep_cache(pipe, cache_interval=3, cache_branch_id=0)` hooks every U-Net of the
pipeline's `unet` (the U-Net itself, or each model of a T-Stitch `StitchedDenoiser`: apply
DeepCache after stitching) with `deep_cache.unet2d`, and gives the pipeline object a
same-named subclass whose `__call__` brackets one run: the feature caches start empty and
are freed when the call returns (or raises). Inside a call, steps count, as the step tracker
T-GATE and T-Stitch use too says (`diffusion.pipeline_steps`: the progress-bar step of each U-Net
call): a full U-Net pass at the first step and every `cache_interval`-th step after the last full
one (the DeepCache package's uniform schedule, for pipelines that call the U-Net once per step),
and whenever another technique asks for a refresh (T-GATE at its gate,
`diffusion.feature_refresh`). All calls of a step are full or all are cached: Heun's two calls per
step, PNDM's warm-up entry (part of the first step) and separate CFG passes (each pass reuses its
own features); a call whose input shape differs from what was recorded runs in full. With
T-Stitch each model keeps its own cache, so the first call of a model stitched in is full.

`handle.remove()` / `remove_deep_cache(pipe)` restores the pipeline's class and every module
bitwise. Applied to a U-Net module instead of a pipeline, the caches act from then on
(`handle.reset()` starts a new run) until `handle.remove()`.
"""
from __future__ import annotations

import functools

import torch.nn as nn

from diffusion.errors import UserError
from diffusion.pipeline_steps import PipelineSteps

from .hook import check_settings
from .unet2d import attach_unet2d_cache, detach_unet2d_cache, find_diffusers_unets

HANDLE_ATTRIBUTE = "_deep_cache_handle"  # on the per-pipeline subclass, or on a hooked U-Net


def _is_pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def deep_cache_of(target):
    """The DeepCache handle applied to a pipeline or a U-Net module, or None."""
    if _is_pipeline(target):
        return getattr(type(target), HANDLE_ATTRIBUTE, None)  # also under subclasses other techniques added
    return getattr(target, HANDLE_ATTRIBUTE, None)


class DeepCache:
    """DeepCache on the U-Nets of a pipeline (or of one module): what `apply_deep_cache` returns.

    Also the owner the U-Net hooks read: `cache_interval`, `cache_branch_id`, `active` (inside a
    run), `refresh` (the next step must be full) and `locate_call` (the step of a U-Net call).
    """

    def __init__(self, target, cache_interval: int = 3, cache_branch_id: int = 0):
        check_settings(cache_interval, cache_branch_id)
        self.cache_interval, self.cache_branch_id = cache_interval, cache_branch_id
        self.active, self.refresh = False, False
        self.pipe = target if _is_pipeline(target) else None
        self.steps = PipelineSteps()  # the step of each U-Net call inside a pipeline call
        if self.pipe is not None:
            module = getattr(target, "unet", None)
            if not isinstance(module, nn.Module):
                has = "a `transformer`" if isinstance(getattr(target, "transformer", None), nn.Module) else "no `unet`"
                raise UserError(f"deep_cache: {type(target).__name__} has {has}; DeepCache needs a U-Net pipeline "
                                 "(SD 1.x/2.x, SD-XL and the pipelines built on them)")
        elif isinstance(target, nn.Module):
            module = target
        else:
            raise TypeError(f"deep_cache: expected a diffusers pipeline or a U-Net module, got {type(target).__name__}")
        if deep_cache_of(target) is not None:
            raise UserError(f"deep_cache is already applied to this {type(target).__name__}; remove it first")
        self.unets = find_diffusers_unets(module)
        if not self.unets:
            raise UserError(f"deep_cache: {type(module).__name__} has no U-Net with down_blocks, mid_block and "
                             "up_blocks (DeepCache works on U-Nets such as SD's and SD-XL's, not on transformers)")
        self.caches = []
        try:
            for unet in self.unets:
                self.caches.append(attach_unet2d_cache(unet, self))
        except Exception:
            for unet in self.unets:
                detach_unet2d_cache(unet)
            raise
        self._running = 0  # nesting depth of pipeline calls
        if self.pipe is not None:
            self._class = type(target)
            target.__class__ = _bracketed_class(self._class, self)
        else:
            self._module = target
            setattr(target, HANDLE_ATTRIBUTE, self)
            self.active = True  # a bare module: every call counts until remove()
        self.removed = False

    def reset(self) -> None:
        """A new run: empty caches, the next U-Net call is full."""
        self.refresh = False
        for cache in self.caches:
            cache.reset_state()

    def locate_call(self, register: bool = True):
        """The step of a U-Net call made now (a `diffusion.pipeline_steps.StepCall`), registered as made when
        `register`; None on a bare U-Net (every call is a step of its own)."""
        if not self.steps.running:
            return None
        return self.steps.call() if register else self.steps.current()

    def _start_call(self) -> None:
        if self._running == 0:
            self.reset()
            self.steps.start(self.pipe.scheduler)
            self.active = True
        self._running += 1

    def _end_call(self) -> None:
        self._running -= 1
        if self._running == 0:
            self.active = False
            self.steps.stop()
            self.reset()  # frees the features; a U-Net call outside a pipeline call is plain

    def remove(self) -> None:
        """Everything as it was before apply_deep_cache (idempotent)."""
        if self.removed:
            return
        if self.pipe is not None:
            if type(self.pipe).__dict__.get(HANDLE_ATTRIBUTE) is not self:
                raise RuntimeError("deep_cache: another technique was applied to this pipeline after DeepCache; "
                                   "remove that one first (in the reverse order of applying)")
            self.pipe.__class__ = self._class
        else:
            delattr(self._module, HANDLE_ATTRIBUTE)
        for unet in self.unets:
            detach_unet2d_cache(unet)
        self.active = False
        self.removed = True

    def __enter__(self) -> DeepCache:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _bracketed_class(cls: type, handle: DeepCache) -> type:
    """A same-named subclass of the pipeline's class whose __call__ marks the start and end of a run."""
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        handle._start_call()
        try:
            return original(self, *args, **kwargs)
        finally:
            handle._end_call()

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, HANDLE_ATTRIBUTE: handle})


def apply_deep_cache(target, cache_interval: int = 3, cache_branch_id: int = 0) -> DeepCache:
    """DeepCache on every later call of a diffusers U-Net pipeline (or on a U-Net module); returns the
    handle whose `remove()` undoes it. cache_branch_id counts as the DeepCache package does."""
    return DeepCache(target, cache_interval, cache_branch_id)


def remove_deep_cache(target) -> None:
    """Undo apply_deep_cache on a pipeline or a module (nothing to do when it has none)."""
    handle = deep_cache_of(target)
    if handle is not None:
        handle.remove()
