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

Steps, not calls, are full or cached. The owner says which step a call belongs to (on a pipeline,
the step tracker T-GATE and T-Stitch use too, `diffusion.pipeline_steps`; in the sampler loop or on
a bare U-Net every call is a step of its own). The first call of a step decides for all of its
calls: the step is full at the first step, every `cache_interval`-th step after the last full
one, and after `refresh_features()` (T-GATE at its gate, `diffusion.feature_refresh`). Every call
of a full step records what it computed; a call of a cached step reuses what the last full step
recorded for the same pass of an entry (a pipeline that makes separate CFG passes keeps the
features of each branch apart; Heun's and PNDM's two entries of a step are the same pass, so a
cached step reuses the features of the full step's latest entry). A call whose input shape
differs from that record (a new batch, guidance switched off) runs in full.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from diffusion.compile import kept
from diffusion.errors import UserError

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
        raise UserError(f"deep_cache cache_branch_id={branch_id}: this {type(unet).__name__} has branches "
                         f"{allowed} (id = 3 * block + layer, as the DeepCache package counts them)")
    block, layer = divmod(branch_id, 3)
    parts = []
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            parts.append((f"down_blocks.{i}", down))
        elif i == block:
            for kind in ("resnets", "attentions"):
                parts += [(f"down_blocks.{i}.{kind}.{k}", m) for k, m in enumerate(_layers(down, kind)) if k >= layer]
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
                parts += [(f"up_blocks.{j}.{kind}.{k}", m) for k, m in enumerate(_layers(up, kind))
                          if n - 1 - k > layer]
    return parts


def _input_shape(args, kwargs) -> tuple:
    x = args[0] if args else kwargs.get("sample")
    return tuple(x.shape)


class PartReplay(ModelHook):
    """On one skipped part: record its output on full steps, hand it back on cached steps."""

    def __init__(self, cache: UNet2DFeatureCache, name: str):
        super().__init__()
        self.cache, self.name = cache, name
        self.outputs: dict = {}  # pass index -> what the part returned for that pass at the last full step
        self.inner = None  # the part's own forward, compiled (compile_inner); None: fn_ref.original_forward

    def compile_inner(self, compile_method) -> None:
        """compile=regional/full: the part's own forward as a compiled region; the replay decision stays
        eager (traced, each mode would be a guard of the enclosing compiled block)."""
        self.inner = compile_method(self.fn_ref.original_forward)

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        mode, key = self.cache.mode, self.cache.pass_index
        if mode == REPLAY:
            if key not in self.outputs:
                raise RuntimeError(f"deep_cache: {self.name} has no recorded output to reuse")
            return self.outputs[key]
        out = (self.inner or self.fn_ref.original_forward)(*args, **kwargs)
        if mode == RECORD:
            self.outputs[key] = kept(out)  # a clone under CUDA graphs (diffusion.compile.kept)
        return out


class UNet2DFeatureCache(ModelHook):
    """On one diffusers U-Net: decides per step whether it is full or cached (see the module docstring).

    owner: has `cache_interval`, `cache_branch_id`, `active` (False: the plain model), `refresh`
    (the next step must be full; a full step clears it) and `locate_call(register)`: the
    `diffusion.pipeline_steps.StepCall` of a call made now (registered as made when `register`),
    or None when every call is a step of its own.
    """

    _is_stateful = True

    def __init__(self, owner, unet: nn.Module):
        super().__init__()
        self.owner = owner
        self.parts = skipped_parts(unet, owner.cache_branch_id)  # checks the branch against this U-Net
        self.replays: list[PartReplay] = []
        self.mode, self.pass_index = PLAIN, 0  # what the parts do in the call under way, and its pass
        self.records: dict[int, tuple] = {}  # pass index -> input shape of the full call that recorded it
        self.countdown = 0                    # cached steps left before the next full one
        self.step: int | None = None          # step of the last call (None: not known, or no call yet)
        self.step_full = True                 # whether that step is a full one

    @property
    def shape(self) -> tuple | None:
        """Input shape of the first pass's record (None: nothing recorded)."""
        return self.records.get(0)

    def refresh_features(self) -> None:
        """The next step recomputes everything (diffusion.feature_refresh)."""
        self.owner.refresh = True

    def _forget(self) -> None:
        self.records = {}
        for replay in self.replays:
            replay.outputs = {}

    def reset_state(self, module=None):
        self._forget()
        self.countdown, self.mode, self.pass_index, self.step, self.step_full = 0, PLAIN, 0, None, True
        return module

    def _where(self, register: bool) -> tuple[int | None, int]:
        where = self.owner.locate_call(register)
        return (None, 0) if where is None else (where.step, where.pass_index)

    def is_full(self, shape: tuple) -> bool:
        """Whether a call made now with input `shape` runs the whole U-Net (reads state only)."""
        step, pass_index = self._where(register=False)
        if self.records.get(pass_index) != shape:
            return True  # nothing of this shape recorded for this pass
        if step is not None and step == self.step:
            return self.step_full  # decided at the step's first call
        return self.owner.refresh or self.countdown <= 0

    def new_forward(self, unet, *args, **kwargs):
        original = self.fn_ref.original_forward
        if not self.owner.active:  # outside a sampling run: the plain model
            return original(*args, **kwargs)
        shape = _input_shape(args, kwargs)
        full = self.is_full(shape)
        step, self.pass_index = self._where(register=True)
        if step is None or step != self.step:  # the first call of a step decides for the step
            self.step, self.step_full = step, full
            if full:
                self._forget()  # a cached step reuses what this step records, nothing older
                self.countdown, self.owner.refresh = self.owner.cache_interval - 1, False
            else:
                self.countdown -= 1
        if full:
            self.records.pop(self.pass_index, None)  # a failed call leaves nothing to reuse
            self.mode = RECORD
            try:
                out = original(*args, **kwargs)
            finally:
                self.mode = PLAIN
            self.records[self.pass_index] = shape
            return out
        self.mode = REPLAY
        try:
            return original(*args, **kwargs)
        finally:
            self.mode = PLAIN

    # MACs counting (diffusion.macs.count_sampling_macs, one call per step): what a call computes depends on
    # this state
    def count_key(self):
        return tuple(sorted(self.records.items())), self.countdown

    def snapshot(self):
        return [dict(r.outputs) for r in self.replays], dict(self.records), self.countdown

    def restore(self, snapshot) -> None:
        outputs, records, self.countdown = snapshot
        self.records = dict(records)
        for replay, output in zip(self.replays, outputs, strict=True):
            replay.outputs = dict(output)


def attach_unet2d_cache(unet: nn.Module, owner) -> UNet2DFeatureCache:
    """Hook `unet` (and its skipped parts) for DeepCache driven by `owner`."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise UserError(f"deep_cache is already applied to this {type(unet).__name__}")
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
    for _name, part in cache.parts:
        _unhook(part, PART_HOOK_NAME)
    _unhook(unet, HOOK_NAME)
