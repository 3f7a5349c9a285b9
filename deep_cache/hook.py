"""DeepCache as a sampler hook, from outside the model.

A U-Net's skip connections give a shallow path: on a cached step only the first
`cache_branch_id + 1` input blocks and the last `cache_branch_id + 1` output blocks
run; the feature entering output block `n - 1 - cache_branch_id` (n output blocks) is
taken from the last full step. Uniform schedule: a full step every `cache_interval`
steps. With the CompVis layout (3 input blocks per level at num_res_blocks=2) this is
the `DeepCache` package's `cache_branch_id` (block = id // 3, layer = id % 3).

A step is full, whatever the interval, when the model has no cached feature of this
batch size (first call, a model stitched in, guidance switched off) or when another
hook asks (`StepContext.refresh_features`: T-GATE at gate_step - 1 and gate_step, as
tgate's DeepCache loaders reset the helper there).

Works on any module with the native U-Net's parts (`input_blocks`, `middle_block`,
`output_blocks`, `embed`, `head`), found inside a denoiser wrapper, and on diffusers' U-Nets
(`UNet2DConditionModel`: SD 1.x/2.x, SD-XL; deep_cache.unet2d), e.g. when
scripts/count_macs.py counts them on `meta`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from diffusion import Hook, SamplingPlan, StepContext
from diffusion.compile import kept
from diffusion.errors import UserError

from .unet2d import attach_unet2d_cache, detach_unet2d_cache, find_diffusers_unets

HOOK_NAME = "deep_cache"
UNET_PARTS = ("input_blocks", "middle_block", "output_blocks", "embed", "head")


def find_unet(model: nn.Module) -> nn.Module | None:
    """The first submodule (or the model) laid out as the native U-Net."""
    for _, module in model.named_modules():
        if all(hasattr(module, part) for part in UNET_PARTS):
            return module
    return None


def check_settings(cache_interval, cache_branch_id) -> None:
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise UserError(f"deep_cache cache_interval={cache_interval!r}: must be an integer >= 1 (1 = no caching)")
    if isinstance(cache_branch_id, bool) or not isinstance(cache_branch_id, int) or cache_branch_id < 0:
        raise UserError(f"deep_cache cache_branch_id={cache_branch_id!r}: must be an integer >= 0")


class UNetFeatureCache(ModelHook):
    """On one U-Net: full forwards record the deep feature, cached steps run the shallow path."""

    _is_stateful = True

    def __init__(self, owner: "DeepCacheHook", unet: nn.Module):
        super().__init__()
        n = len(unet.output_blocks)
        b = owner.cache_branch_id
        if b >= n:
            raise UserError(f"deep_cache cache_branch_id={b}: this U-Net has {n} input blocks, so 0..{n - 1} allowed")
        self.owner, self.branch = owner, b
        # the module whose output enters output block n-1-b (the middle block for the deepest branch)
        source = unet.middle_block if b == n - 1 else unet.output_blocks[n - 2 - b]
        self._capture = source.register_forward_hook(self._record)
        self._recording = False
        self.feature: torch.Tensor | None = None   # (rows, C, h, w) from the last full step
        self.countdown = 0                           # cached steps left before the next full one

    # MACs counting (diffusion.macs.count_sampling_macs): what a call computes depends on this state
    def count_key(self):
        return (None if self.feature is None else tuple(self.feature.shape)), self.countdown

    def snapshot(self):
        return self.feature, self.countdown

    def restore(self, snapshot) -> None:
        self.feature, self.countdown = snapshot

    def _record(self, module, args, output) -> None:
        if self._recording:
            self.feature = kept(output)  # a clone under CUDA graphs (diffusion.compile.kept)

    def remove(self) -> None:
        self._capture.remove()

    def reset_state(self, module):
        self.feature, self.countdown = None, 0
        return module

    def is_full(self, rows: int) -> bool:
        """Whether the coming call runs the whole U-Net (decided from state only: MACs counting reads it)."""
        if not self.owner.active:
            return True
        stale = self.feature is None or self.feature.shape[0] != rows
        return stale or self.owner.refresh or self.countdown == 0

    def new_forward(self, unet: nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                    context: torch.Tensor | None = None, y: torch.Tensor | None = None):
        if not self.owner.active:  # outside a sampling run: the plain model
            return self.fn_ref.original_forward(x, timesteps, context=context, y=y)
        if self.is_full(x.shape[0]):
            self._recording = True
            try:
                out = self.fn_ref.original_forward(x, timesteps, context=context, y=y)
            finally:
                self._recording = False
            self.countdown = self.owner.cache_interval - 1
            return out
        self.countdown -= 1
        return self._shallow(unet, x, timesteps, context, y)

    def _shallow(self, unet, x, timesteps, context, y) -> torch.Tensor:
        """The first b+1 input blocks, the cached deep feature, the last b+1 output blocks."""
        unet.check_input(x, context)
        emb = unet.embed(timesteps, y, batch=x.shape[0])
        h, skips = x, []
        for block in unet.input_blocks[: self.branch + 1]:
            h = block(h, emb, context)
            skips.append(h)
        h = self.feature
        for block in unet.output_blocks[len(unet.output_blocks) - 1 - self.branch:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return unet.head(h.type(x.dtype))


class DeepCacheHook(Hook):
    """Uniform DeepCache on every U-Net of the run (each keeps its own feature).

    cache_interval: a full step every `cache_interval` steps (1 = every step: the plain model).
    cache_branch_id: the shallow path is input blocks 0..id and the matching output blocks.
    """

    def __init__(self, cache_interval: int = 3, cache_branch_id: int = 0):
        check_settings(cache_interval, cache_branch_id)
        self.cache_interval, self.cache_branch_id = cache_interval, cache_branch_id
        self.active = False   # True during a sampling run
        self.refresh = False  # this step must be full (StepContext.refresh_features)
        self._caches: list[UNetFeatureCache] = []
        self._unets: list[nn.Module] = []

    def attach(self, models, names, solver) -> None:
        self.detach()
        unets = []
        for model, name in zip(models, names, strict=True):
            unet = find_unet(model)
            if unet is None:
                unet = next(iter(find_diffusers_unets(model)), None)
            if unet is None:
                raise UserError(f"deep_cache needs a U-Net (the native one: {', '.join(UNET_PARTS)}; or diffusers' "
                                 f"UNet2DConditionModel: SD 1.x/2.x, SD-XL); {name} ({type(model).__name__}) has none")
            unets.append(unet)
        try:
            for unet in unets:
                self._caches.append(attach_feature_cache(unet, self))
                self._unets.append(unet)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for unet in self._unets:
            detach_feature_cache(unet)
        self._caches, self._unets = [], []

    def start(self, plan: SamplingPlan) -> None:
        self.active, self.refresh = True, False
        for cache in self._caches:
            cache.reset_state(None)

    def step(self, ctx: StepContext) -> None:
        self.refresh = ctx.refresh_features

    def locate_call(self, register: bool = True):
        """The sampler loop calls each denoiser once per step: every call is a step of its own (deep_cache.unet2d)."""
        return None

    def end(self) -> None:
        self.active = False
        for cache in self._caches:
            cache.reset_state(None)

    # MACs counting (diffusion.macs.count_sampling_macs): what a forward computes depends on the caches
    def count_state(self):
        key = (self.refresh, tuple(c.count_key() for c in self._caches))
        return key, [c.snapshot() for c in self._caches]

    def restore_count_state(self, snapshot) -> None:
        for cache, state in zip(self._caches, snapshot, strict=True):
            cache.restore(state)


def attach_feature_cache(unet: nn.Module, owner):
    """DeepCache on one U-Net, native (input_blocks, ...) or diffusers (down_blocks, ...), driven by `owner`
    (cache_interval, cache_branch_id, active, refresh)."""
    if not all(hasattr(unet, part) for part in UNET_PARTS):
        return attach_unet2d_cache(unet, owner)
    existing = getattr(unet, "_diffusers_hook", None)
    if existing is not None and existing.get_hook(HOOK_NAME) is not None:
        raise UserError(f"deep_cache is already applied to this {type(unet).__name__}")
    cache = UNetFeatureCache(owner, unet)  # checks the settings against this U-Net first
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(cache, HOOK_NAME)
    return cache


def detach_feature_cache(unet: nn.Module) -> None:
    """Undo attach_feature_cache: the U-Net's own forward, no hook left on it."""
    if not all(hasattr(unet, part) for part in UNET_PARTS):
        detach_unet2d_cache(unet)
        return
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        return
    registry.get_hook(HOOK_NAME).remove()
    registry.remove_hook(HOOK_NAME, recurse=False)
    if not registry.hooks:
        if getattr(unet.forward, "__func__", None) is type(unet).forward:
            del unet.forward
        del unet._diffusers_hook
