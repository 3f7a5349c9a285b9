"""The six caches diffusers 0.42 ships, each applied with diffusers' own `apply_*` / hook functions.

Our part is only what diffusers leaves to the caller (caches.harness) and where its module
finders do not see our DiT (caches.registry): PAB and FasterCache keep to diffusers' `Attention`
classes, so their per-module appliers are called on our marked attention modules too.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_sea_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks import faster_cache as _fc
from diffusers.hooks import pyramid_attention_broadcast as _pab
from diffusers.utils.torch_utils import unwrap_module

from diffusion import SamplingPlan
from diffusion.errors import UserError

from .harness import CacheHook
from .mag_calibration import load as load_calibration
from .mag_calibration import ratios_for
from .mag_calibration import resolve as resolve_calibration
from .mag_calibration import save as save_calibration
from .registry import attention_modules, block_lists, check_blocks


def _number(key: str, value, low: float, integer: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or not math.isfinite(value) or value < low:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{key}={value!r}: must be {kind} >= {low}" + (" or null" if allow_none else ""))
    return value


def _range(key: str, value) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise UserError(f"{key}={value!r}: must be a pair [low, high] of timesteps (0..1000)")
    return (_number(key, value[0], -1), _number(key, value[1], -1))


def _refuse_sd3_tail(blocks, name: str, cache: str, why: str = "diffusers' FirstBlockCache subtracts from "
                     "them (a TypeError inside it)") -> None:
    """SD3's last joint block returns no text states (context_pre_only)."""
    last = unwrap_module(blocks[-1][1])
    if getattr(last, "context_pre_only", False):
        raise UserError(f"{cache} cannot run on {name}: its last block ({type(last).__name__}, context_pre_only) "
                         f"returns no text states; {why}; on SD3 use taylorseer, pab or faster_cache")


class FirstBlockCacheHook(CacheHook):
    """FirstBlockCache (ParaAttention): run the first block; when its residual changed by less than
    `threshold` (relative L1) since the last full step, reuse the other blocks' cached residual."""

    name = "first_block_cache"

    def __init__(self, threshold: float = 0.2):
        super().__init__()
        self.threshold = _number("accel.first_block_cache.threshold", threshold, 0)

    def apply(self, model, name, index):
        blocks = check_blocks(model, name, self.name)
        _refuse_sd3_tail(blocks, name, self.name)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=float(self.threshold)))


class TaylorSeerHook(CacheHook):
    """TaylorSeer: every block computed every `cache_interval` steps (and before `disable_cache_before_step`,
    after `disable_cache_after_step`); in between its output is a Taylor extrapolation of order `max_order`.
    diffusers' default identifiers hook modules named `attn` only; we name the block stacks."""

    name = "taylorseer"

    def __init__(self, cache_interval: int = 3, disable_cache_before_step: int = 5,
                 disable_cache_after_step: int | None = None, max_order: int = 1, factors_dtype: str = "float32"):
        super().__init__()
        self.cache_interval = _number("accel.taylorseer.cache_interval", cache_interval, 1, integer=True)
        self.before = _number("accel.taylorseer.disable_cache_before_step", disable_cache_before_step, 0, integer=True)
        self.after = _number("accel.taylorseer.disable_cache_after_step", disable_cache_after_step, 0, integer=True,
                             allow_none=True)
        self.max_order = _number("accel.taylorseer.max_order", max_order, 0, integer=True)
        if factors_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"accel.taylorseer.factors_dtype={factors_dtype!r}: allowed values are float32, "
                             "bfloat16, float16")
        self.factors_dtype = getattr(torch, factors_dtype)

    def apply(self, model, name, index):
        blocks = check_blocks(model, name, self.name)
        # SD3's last joint block returns no text states (context_pre_only): diffusers' TaylorSeer cannot
        # extrapolate a None output, so that block is always computed
        patterns = [re.escape(block_name) for block_name, block in blocks
                    if not getattr(unwrap_module(block), "context_pre_only", False)]
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=self.cache_interval, disable_cache_before_step=self.before,
            disable_cache_after_step=self.after, max_order=self.max_order,
            taylor_factors_dtype=self.factors_dtype, cache_identifiers=patterns))


class PABHook(CacheHook):
    """Pyramid Attention Broadcast: inside (low, high) timesteps, self-attention is computed every
    `spatial_skip` calls and broadcast (reused) in between; cross-attention every `cross_skip`."""

    name = "pab"
    uses_contexts = False  # PAB keeps one state per attention module

    def __init__(self, spatial_skip: int | None = 2, cross_skip: int | None = None,
                 timestep_range=(100, 800)):
        super().__init__()
        self.spatial = _number("accel.pab.spatial_skip", spatial_skip, 1, integer=True, allow_none=True)
        self.cross = _number("accel.pab.cross_skip", cross_skip, 1, integer=True, allow_none=True)
        self.range = _range("accel.pab.timestep_range", timestep_range)
        if self.spatial is None and self.cross is None:
            raise UserError("accel.pab: spatial_skip and cross_skip are both null; set one "
                             "(2 = reuse every other step)")

    def apply(self, model, name, index):
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial, cross_attention_block_skip_range=self.cross,
            spatial_attention_timestep_skip_range=self.range, cross_attention_timestep_skip_range=self.range,
            current_timestep_callback=lambda: self.timestep)
        found = attention_modules(model)
        if not found:
            raise UserError(f"pab needs attention modules inside transformer blocks; {name} has none")
        apply_pyramid_attention_broadcast(model, config)  # diffusers' Attention classes
        for module_name, module in found:  # ours (timm's Attention in DiT), by the same per-module applier
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or registry.get_hook(_pab._PYRAMID_ATTENTION_BROADCAST_HOOK) is None:
                _pab._apply_pyramid_attention_broadcast_on_attention_class(module_name, module, config)


class FasterCacheHook(CacheHook):
    """FasterCache: attention outputs extrapolated between computed steps (`spatial_skip`), and the
    unconditional branch approximated from the conditional one in frequency space every step but one
    in `uncond_skip` (CFG-Cache). diffusers wants CFG as one [uncond; cond] batch; our sampler's is
    [cond; uncond], so the rows are swapped around the call (a permutation: bitwise the same rows)."""

    name = "faster_cache"
    uses_contexts = False

    def __init__(self, spatial_skip: int = 2, spatial_range=(-1, 681), uncond_skip: int = 5,
                 uncond_range=(-1, 641), attention_weight: float = 0.5, alpha_low: float = 1.1,
                 alpha_high: float = 1.1, cond_key: str = "y"):
        super().__init__()
        self.spatial = _number("accel.faster_cache.spatial_skip", spatial_skip, 1, integer=True)
        self.spatial_range = _range("accel.faster_cache.spatial_range", spatial_range)
        self.uncond = _number("accel.faster_cache.uncond_skip", uncond_skip, 1, integer=True)
        self.uncond_range = _range("accel.faster_cache.uncond_range", uncond_range)
        self.weight = _number("accel.faster_cache.attention_weight", attention_weight, 0)
        self.alpha_low = _number("accel.faster_cache.alpha_low", alpha_low, 0)
        self.alpha_high = _number("accel.faster_cache.alpha_high", alpha_high, 0)
        self.cond_key = cond_key

    def check_plan(self, plan: SamplingPlan) -> None:
        if not plan.use_cfg:
            raise UserError("faster_cache needs classifier-free guidance (its CFG-Cache approximates the "
                             "unconditional branch); sampler.cfg_scale=1 runs none")

    def apply(self, model, name, index):
        found = attention_modules(model)
        lists = "|".join(n for n, _ in block_lists(model))
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=self.spatial, spatial_attention_timestep_skip_range=self.spatial_range,
            unconditional_batch_skip_range=self.uncond, unconditional_batch_timestep_skip_range=self.uncond_range,
            alpha_low_frequency=self.alpha_low, alpha_high_frequency=self.alpha_high,
            attention_weight_callback=lambda _: self.weight, current_timestep_callback=lambda: self.timestep,
            tensor_format="BCHW", spatial_attention_block_identifiers=(rf"({lists})\.\d+\.",),
            _unconditional_conditional_input_kwargs_identifiers=[
                "hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask",
                "class_labels", "pooled_projections", self.cond_key])
        apply_faster_cache(model, config)
        for module_name, module in found:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or registry.get_hook(_fc._FASTER_CACHE_BLOCK_HOOK) is None:
                _fc._apply_faster_cache_on_attention_class(module_name, module, config)

    def before_call(self, index, module, args, kwargs):
        if self.pipeline is not None:  # diffusers' pipelines batch CFG as [uncond; cond] already
            return args, kwargs
        if not (self.ctx is None or self.ctx.guidance):
            raise UserError("faster_cache needs both CFG branches at every step; guidance was turned off at step "
                             f"{self.ctx.i} (T-GATE's gate): use faster_cache without tgate")
        return _swap_halves(args), {k: _swap_halves((v,))[0] for k, v in kwargs.items()}

    def after_call(self, index, module, out):
        return out if self.pipeline is not None else _swap_halves((out,))[0]


def _swap_halves(values):
    """[a; b] -> [b; a] along the batch for every tensor with rows (CFG order cond-first <-> uncond-first)."""
    return tuple(torch.cat(v.chunk(2)[::-1]) if torch.is_tensor(v) and v.ndim and v.shape[0] % 2 == 0 else v
                 for v in values)


class MagCacheHook(CacheHook):
    """MagCache: skip the blocks while the accumulated error of the residual-magnitude ratios stays
    under `threshold` (at most `max_skip_steps` in a row, never in the first `retention_ratio` of a
    model's steps). The ratios are the model's: calibrate once (`calibrate: true`), then load by name."""

    name = "mag_cache"

    def __init__(self, threshold: float = 0.06, max_skip_steps: int = 3, retention_ratio: float = 0.2,
                 calibration: str | None = None, calibrate: bool = False):
        super().__init__()
        self.threshold = _number("accel.mag_cache.threshold", threshold, 0)
        self.max_skip = _number("accel.mag_cache.max_skip_steps", max_skip_steps, 0, integer=True)
        self.retention = _number("accel.mag_cache.retention_ratio", retention_ratio, 0)
        if not isinstance(calibrate, bool):
            raise UserError(f"accel.mag_cache.calibrate={calibrate!r}: must be true or false")
        self.calibrate = calibrate
        self.calibration = calibration
        self.path = resolve_calibration(calibration)
        self.table = None if calibrate else load_calibration(self.path, calibration)
        self.configs: list[MagCacheConfig] = []
        self.recorded: dict[str, dict[int, list[float]]] = {}
        self._calls: dict[tuple[int, str], int] = {}

    def apply(self, model, name, index):
        check_blocks(model, name, self.name)
        n = self.solver.num_steps
        if self.calibrate:
            config = MagCacheConfig(calibrate=True, num_inference_steps=n + 1)  # never wraps inside a run
        else:
            ratios = ratios_for(self.table, name, n, self.calibration)
            config = MagCacheConfig(threshold=float(self.threshold), max_skip_steps=self.max_skip,
                                    retention_ratio=float(self.retention), num_inference_steps=n + 1,
                                    mag_ratios=torch.ones(n + 1))
            config.global_ratios = ratios  # by trajectory step; copied to the model's own step each call
        self.configs.append(config)
        apply_mag_cache(model, config)

    def start(self, plan):
        super().start(plan)
        self._calls = {}
        if self.plan is not None:
            for config in self.configs:  # diffusers counts retention from num_inference_steps: the run's
                config.num_inference_steps = plan.num_steps

    def reset_model(self, index):
        super().reset_model(index)
        self._calls = {k: v for k, v in self._calls.items() if k[0] != index}

    def before_call(self, index, module, args, kwargs):
        key = (index, self.branch_name())
        local = self._calls.get(key, 0)
        self._calls[key] = local + 1
        config = self.configs[index]
        if not self.calibrate and self.ctx is not None:
            config.mag_ratios[local] = float(config.global_ratios[self.ctx.i])
        return args, kwargs

    def after_call(self, index, module, out):
        if self.calibrate and self.ctx is not None:
            state = self._state(index)
            if state is not None and state.calibration_ratios and self._calls[(index, self.branch_name())] > 1:
                name = self._names[index]
                self.recorded.setdefault(name, {}).setdefault(self.ctx.i, []).append(state.calibration_ratios[-1])
        return out

    def _state(self, index):
        for registry, hook in self._owned[index]:
            manager = getattr(registry.get_hook(hook), "state_manager", None)
            if manager is not None:
                return manager._state_cache.get(self.branch_name())
        return None

    def detach(self):
        if self.calibrate and self.recorded:
            save_calibration(self.path, self.recorded, self.solver.num_steps)
            self.recorded = {}
        super().detach()
        self.configs = []

    def run_metrics(self):
        return {"mag_cache_calibration": None if self.calibrate else self.calibration,
                "mag_cache_calibrating": self.calibrate}


class SeaCacheHook(CacheHook):
    """SeaCache: skip the block stack while the accumulated change of a spectrally filtered view of the
    input latent (its SEA indicator) stays under `threshold`; the skipped stack's residual is
    extrapolated (`residual_order` 1) from the last two full steps. diffusers' SeaCache reads the step
    index, step count and sigma from the cache context and the latent from `raw_vision_callback`:
    we give it each sample's latent as one frame, and sigma as the flow-matching sigma of the same
    signal-to-noise ratio, sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) for alphas_cumprod a."""

    name = "sea_cache"

    def __init__(self, threshold: float = 0.25, residual_order: int = 1, retention_steps: int = 1,
                 cache_end_steps: int = 1, max_consecutive_cached: int = 2, power_exp: float = 3.0):
        super().__init__()
        self.kwargs = dict(
            threshold=float(_number("accel.sea_cache.threshold", threshold, 0)),
            residual_order=_number("accel.sea_cache.residual_order", residual_order, 0, integer=True),
            retention_steps=_number("accel.sea_cache.retention_steps", retention_steps, 0, integer=True),
            cache_end_steps=_number("accel.sea_cache.cache_end_steps", cache_end_steps, 0, integer=True),
            max_consecutive_cached=_number("accel.sea_cache.max_consecutive_cached", max_consecutive_cached, 0,
                                           integer=True),
            power_exp=float(_number("accel.sea_cache.power_exp", power_exp, 1e-9)))
        if self.kwargs["residual_order"] > 1:
            raise UserError(f"accel.sea_cache.residual_order={residual_order!r}: allowed values are 0, 1")
        self.fail_open: list[str] = []

    def apply(self, model, name, index):
        blocks = check_blocks(model, name, self.name)
        _refuse_sd3_tail(blocks, name, self.name, "SeaCache records no residual history without them "
                         "(it would silently run every step in full)")
        scheduler = self.solver.scheduler
        if getattr(scheduler, "alphas_cumprod", None) is None and getattr(scheduler, "sigmas", None) is None:
            raise UserError(f"sea_cache needs the sampler's noise level (alphas_cumprod or flow sigmas); "
                             f"{self.solver.name!r} has neither")
        apply_sea_cache(model, SeaCacheConfig(**self.kwargs, raw_vision_callback=_latents_as_frames))

    def context_fields(self) -> dict:
        ctx = self.ctx
        if ctx is None:
            return {}
        alphas = getattr(self.solver.scheduler, "alphas_cumprod", None)
        if alphas is None:  # flow matching (SD3): timestep = 1000 sigma
            sigma = min(max(float(ctx.timestep) / 1000, 0.0), 1.0)
        else:
            a = float(alphas[int(ctx.timestep)])
            sigma = math.sqrt(1 - a) / (math.sqrt(a) + math.sqrt(1 - a))
        return {"step_index": ctx.i, "num_inference_steps": ctx.n, "sigma": sigma, "timestep": ctx.timestep}

    def after_call(self, index, module, out):
        for registry, hook in self._owned[index]:
            shared = getattr(registry.get_hook(hook), "shared_state", None)
            for message in sorted(getattr(shared, "_warned_messages", ())):  # diffusers' fail-open warnings
                if message not in self.fail_open:
                    self.fail_open.append(message)
        return out

    def run_metrics(self):
        return {"sea_cache_fail_open": self.fail_open}


def _latents_as_frames(module: nn.Module, args, kwargs):
    """SeaCache's raw vision: each sample's latent (C, H, W) as a one-frame video (C, 1, H, W)."""
    x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
    if not torch.is_tensor(x) or x.ndim != 4:
        return None
    return [sample.unsqueeze(1) for sample in x]
