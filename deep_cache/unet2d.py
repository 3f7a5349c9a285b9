"""DeepCache on diffusers' U-Nets (`UNet2DConditionModel`: SD 1.x/2.x, SD-XL, ...), from outside.

The `DeepCache` package (`DeepCacheSDHelper`) names the parts of the U-Net by (block, layer)
and `cache_branch_id = 3 * block + layer`:

- down block i: resnet / attention l is layer l, its downsampler is layer `len(resnets)`;
- up blocks are counted from the output end (up block j is block `len(up_blocks) - 1 - j`),
  their layers from the last resnet (resnet / attention l is layer `len(resnets) - 1 - l`).

On a cached step only the shallow parts run: down parts with (block, layer) < (b, l), the
up parts with (block, layer) <= (b, l), never the mid block; every other part hands back the
output it produced at the last full step (for SD's two resnets per level this is the native
U-Net's "input blocks 0..id and their output blocks"). Here each outermost skipped part (a
whole block, or single layers inside block b) gets a module hook that records its output on
full steps and replays it on cached ones. The parts that run are untouched, so the time
embedding, ControlNet residuals, custom attention processors and T-GATE's attention hooks
act as in the plain model.

Full steps: the first call, every `cache_interval`-th call after the last full one, a call
whose input shape differs from the recorded one (a new batch, guidance switched off), and a
call after `refresh_features()` (T-GATE at its gate, `diffusion.feature_refresh`).
"""
from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "deep_cache"
PART_HOOK_NAME = "deep_cache_part"
PLAIN, RECORD, REPLAY = "plain", "record", "replay"
UNET2D_PARTS = ("down_blocks", "mid_block", "up_blocks")


def is_diffusers_unet(module: nn.Module) -> bool:
    """A diffusers-style U-Net: down blocks, a mid block and up blocks as real submodules (a stitched
    denoiser that forwards attribute reads to its large model is not one)."""
    return "down_blocks" in module._modules and "up_blocks" in module._modules and "mid_block" in module._modules


def find_diffusers_unets(model: nn.Module) -> list[nn.Module]:
    """Every diffusers-style U-Net in `model` (itself, or each model of a stitched denoiser)."""
    found: list[nn.Module] = []
    for module in model.modules():
        if is_diffusers_unet(module) and not any(_contains(outer, module) for outer in found):
            found.append(module)
    return found


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _layers(block: nn.Module, kind: str) -> list[nn.Module]:
    return list(getattr(block, kind, None) or [])


def allowed_branch_ids(unet: nn.Module) -> list[int]:
    """The cache_branch_id values that name a part of this U-Net: block b < number of down blocks,
    layer l < the number of resnets of up block b (and l <= 2, as ids go by 3)."""
    ups = list(unet.up_blocks)
    ids = []
    for block in range(len(unet.down_blocks)):
        up = ups[len(ups) - 1 - block]
        ids += [3 * block + layer for layer in range(min(3, len(_layers(up, "resnets"))))]
    return ids


def skipped_parts(unet: nn.Module, branch_id: int) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost parts a cached step does not run, by the package's rule."""
    allowed = allowed_branch_ids(unet)
    if branch_id not in allowed:
        raise ValueError(f"deep_cache cache_branch_id={branch_id}: this {type(unet).__name__} has branches "
                         f"{allowed} (id = 3 * block + layer, as the DeepCache package counts them)")
    block, layer = divmod(branch_id, 3)
    parts = []
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            parts.append((f"down_blocks.{i}", down))
        elif i == block:
            for kind in ("resnets", "attentions"):
                parts += [(f"down_blocks.{i}.{kind}.{l}", m) for l, m in enumerate(_layers(down, kind)) if l >= layer]
            if len(_layers(down, "resnets")) >= layer:
                parts += [(f"down_blocks.{i}.downsamplers.{k}", m) for k, m in enumerate(_layers(down, "downsamplers"))]
    if unet.mid_block is not None:
        parts.append(("mid_block", unet.mid_block))
    ups = list(unet.up_blocks)
    for j, up in enumerate(ups):
        i = len(ups) - 1 - j
        if i > block:
            parts.append((f"up_blocks.{j}", up))
        elif i == block:
            n = len(_layers(up, "resnets"))
            for kind in ("resnets", "attentions"):
                parts += [(f"up_blocks.{j}.{kind}.{l}", m) for l, m in enumerate(_layers(up, kind))
                          if n - 1 - l > layer]
    return parts


def _input_shape(args, kwargs) -> tuple:
    x = args[0] if args else kwargs.get("sample")
    return tuple(x.shape)


class PartReplay(ModelHook):
    """On one skipped part: record its output on full steps, hand it back on cached steps."""

    def __init__(self, cache: UNet2DFeatureCache, name: str):
        super().__init__()
        self.cache, self.name = cache, name
        self.output = None  # what the part returned at the last full step

    def new_forward(self, module, *args, **kwargs):
        mode = self.cache.mode
        if mode == REPLAY:
            if self.output is None:
                raise RuntimeError(f"deep_cache: {self.name} has no recorded output to reuse")
            return self.output
        out = self.fn_ref.original_forward(*args, **kwargs)
        if mode == RECORD:
            self.output = out
        return out


class UNet2DFeatureCache(ModelHook):
    """On one diffusers U-Net: decides per call whether it is a full or a cached step.

    owner: has `cache_interval`, `cache_branch_id`, `active` (False: the plain model) and
    `refresh` (the next call must be full; a full call clears it).
    """

    _is_stateful = True

    def __init__(self, owner, unet: nn.Module):
        super().__init__()
        self.owner = owner
        self.parts = skipped_parts(unet, owner.cache_branch_id)  # checks the branch against this U-Net
        self.replays: list[PartReplay] = []
        self.mode = PLAIN
        self.shape: tuple | None = None  # input shape of the last full call (None: nothing recorded)
        self.countdown = 0                # cached calls left before the next full one

    def refresh_features(self) -> None:
        """The next call recomputes everything (diffusion.feature_refresh)."""
        self.owner.refresh = True

    def reset_state(self, module=None):
        self.shape, self.countdown, self.mode = None, 0, PLAIN
        for replay in self.replays:
            replay.output = None
        return module

    def is_full(self, shape: tuple) -> bool:
        return self.shape != shape or self.owner.refresh or self.countdown <= 0

    def new_forward(self, unet, *args, **kwargs):
        original = self.fn_ref.original_forward
        if not self.owner.active:  # outside a sampling run: the plain model
            return original(*args, **kwargs)
        shape = _input_shape(args, kwargs)
        if self.is_full(shape):
            self.shape, self.mode = None, RECORD  # a failed call leaves nothing to reuse
            try:
                out = original(*args, **kwargs)
            finally:
                self.mode = PLAIN
            self.shape, self.countdown, self.owner.refresh = shape, self.owner.cache_interval - 1, False
            return out
        self.countdown -= 1
        self.mode = REPLAY
        try:
            return original(*args, **kwargs)
        finally:
            self.mode = PLAIN

    # MACs counting (diffusion.macs.count_sampling_macs): what a call computes depends on this state
    def count_key(self):
        return self.shape, self.countdown

    def snapshot(self):
        return [r.output for r in self.replays], self.shape, self.countdown

    def restore(self, snapshot) -> None:
        outputs, self.shape, self.countdown = snapshot
        for replay, output in zip(self.replays, outputs):
            replay.output = output


def attach_unet2d_cache(unet: nn.Module, owner) -> UNet2DFeatureCache:
    """Hook `unet` (and its skipped parts) for DeepCache driven by `owner`."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(f"deep_cache is already applied to this {type(unet).__name__}")
    cache = UNet2DFeatureCache(owner, unet)  # checks the settings before anything is hooked
    for name, part in cache.parts:
        replay = PartReplay(cache, name)
        HookRegistry.check_if_exists_or_initialize(part).register_hook(replay, PART_HOOK_NAME)
        cache.replays.append(replay)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(cache, HOOK_NAME)
    return cache


def _unhook(module: nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        # the registry leaves the class's forward as an instance attribute; drop it and the registry
        if getattr(module.forward, "__func__", None) is type(module).forward:
            del module.forward
        del module._diffusers_hook


def detach_unet2d_cache(unet: nn.Module) -> None:
    """Undo attach_unet2d_cache: the U-Net and its parts as they were."""
    registry = getattr(unet, "_diffusers_hook", None)
    cache = registry.get_hook(HOOK_NAME) if registry is not None else None
    if cache is None:
        return
    cache.reset_state()
    for name, part in cache.parts:
        _unhook(part, PART_HOOK_NAME)
    _unhook(unet, HOOK_NAME)
