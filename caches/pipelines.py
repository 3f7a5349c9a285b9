"""The caches on stock diffusers pipelines (PixArt-α/Σ, SD3, Flux: a `transformer` denoiser).

`apply_cache(pipe, "taylorseer", **settings)` applies diffusers' cache to `pipe.transformer` through
the same harness as the native sampler (caches.harness) and gives the pipeline object a same-named
subclass whose `__call__` brackets one run: every call starts with empty caches (diffusers' stock
SD3 and PixArt pipelines reset nothing and enter no cache context; Flux's enters one but resets only
through `enable_cache`). Each transformer call runs in a context named by its place in the step
(`call0`: the batched CFG pass; a second pass of the same step, e.g. Flux's true CFG, `call1`), with
the step index, step count, timestep and sigma from the pipeline's scheduler (diffusion.pipeline_steps).

Refused in one line where diffusers' hook cannot work: FirstBlockCache on SD3 (its last joint block
returns no text states), SeaCache on Flux (latents packed into tokens: no (C, H, W) latent for its
indicator), FasterCache on Flux (guidance-distilled: no CFG batch to approximate), MagCache (its ratios
need a calibration per pipeline: not offered on pipelines yet).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from diffusion import SamplingPlan, StepContext
from diffusion.errors import UserError
from diffusion.pipeline_steps import PipelineSteps

from .techniques import FasterCacheHook, FirstBlockCacheHook, MagCacheHook, PABHook, SeaCacheHook, TaylorSeerHook

HOOKS = {"first_block_cache": FirstBlockCacheHook, "taylorseer": TaylorSeerHook, "mag_cache": MagCacheHook,
         "faster_cache": FasterCacheHook, "pab": PABHook, "sea_cache": SeaCacheHook}
HANDLE_ATTRIBUTE = "_cache_handle"


def check_cache(cache: str, **settings) -> None:
    """Bad settings fail before any pipeline is loaded."""
    build_hook(cache, settings)


def build_hook(cache: str, settings: dict):
    if cache not in HOOKS:
        raise UserError(f"cache={cache!r}: allowed values are {', '.join(HOOKS)}")
    if cache == "mag_cache":
        raise UserError("mag_cache on diffusers pipelines: not offered (its ratios need a calibration per pipeline "
                         "and scheduler); use it on native models (+exp=digits_stitch_0.4 accel=mag_cache)")
    settings = {k: v for k, v in settings.items() if k != "cond_key"}
    return HOOKS[cache](**settings)


class _Scheduler:
    """What the caches read of our solver (caches.techniques), from a pipeline's scheduler."""

    def __init__(self, scheduler):
        self.scheduler, self.name, self.num_steps = scheduler, type(scheduler).__name__, None


class PipelineCache:
    """One cache on one pipeline; `remove()` restores the pipeline's class and every module."""

    def __init__(self, pipe, cache: str, **settings):
        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, nn.Module):
            raise UserError(f"{cache}: {type(pipe).__name__} has no `transformer`; these caches act on transformer "
                             "pipelines (PixArt, SD3, Flux); U-Net pipelines: accel=deep_cache")
        if getattr(type(pipe), HANDLE_ATTRIBUTE, None) is not None:
            raise UserError(f"a cache is already applied to this {type(pipe).__name__}; remove it first")
        kind = type(transformer).__name__
        if cache == "sea_cache" and "Flux" in kind:
            raise UserError("sea_cache cannot run on Flux: its latents are packed into tokens, and SeaCache's "
                             "indicator needs each sample's (C, H, W) latent")
        if cache == "faster_cache" and "Flux" in kind:
            raise UserError("faster_cache cannot run on Flux: the model is guidance-distilled (no CFG batch), and "
                             "FasterCache's CFG-Cache approximates the unconditional half of one")
        self.pipe, self.transformer = pipe, transformer
        self.hook = build_hook(cache, settings)
        self.steps = PipelineSteps()
        self.hook.pipeline = self
        self.hook.attach([transformer], [kind], _Scheduler(pipe.scheduler))
        self._class = type(pipe)
        pipe.__class__ = _bracketed(self._class, self)
        self.removed = False

    # the harness asks, at each transformer call, where the pipeline loop is
    def locate(self, args, kwargs) -> None:
        hook = self.hook
        where = self.steps.call()
        timestep = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        if hook.plan is None:
            n = self.steps.num_steps(timestep)
            rows = next(int(a.shape[0]) for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.ndim)
            hook.plan = SamplingPlan(n, 1, rows, 1.0, True, tuple(float(t) for t in self.steps.step_timesteps()))
            hook.solver.num_steps = n
            hook.check_plan(hook.plan)
        step = min(where.step, hook.plan.num_steps - 1)
        hook.ctx = StepContext(i=step, n=hook.plan.num_steps, t=torch.zeros(()),
                               timestep=hook.plan.model_timesteps[step],
                               guidance=False, branch=f"call{where.pass_index}")

    def remove(self) -> None:
        if self.removed:
            return
        self.pipe.__class__ = self._class
        self.hook.detach()
        self.removed = True


def _bracketed(cls, handle: PipelineCache):
    @functools.wraps(cls.__call__)
    def __call__(self, *args, **kwargs):
        hook = handle.hook
        hook.active, hook.plan, hook.ctx = True, None, None
        for index in range(len(hook._models)):
            hook.reset_model(index)
        with handle.steps.run(self.scheduler):
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                hook.end()
    return type(cls.__name__, (cls,), {"__call__": __call__, HANDLE_ATTRIBUTE: handle})


def apply_cache(pipe, cache: str, **settings) -> PipelineCache:
    """`cache` (first_block_cache, taylorseer, faster_cache, pab, sea_cache) on `pipe`; returns the handle."""
    return PipelineCache(pipe, cache, **settings)


def remove_cache(pipe) -> None:
    handle = getattr(type(pipe), HANDLE_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()
