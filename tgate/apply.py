"""apply_tgate / remove_tgate: gate a model's attention modules, or a whole diffusers pipeline.

Attention modules are found by their `is_cross_attention` marker (native models set
it via `diffusion.attention.mark_attention`; diffusers' `Attention` has it natively),
so this module knows no model class. A diffusers pipeline is handed to
`tgate.pipelines`, which gates its denoiser and drives the schedule from the
pipeline's own calls.
"""
from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry

from diffusion.attention import find_attention, is_joint_attention

from .config import TGateConfig
from .module_hook import AttentionGateHook
from .state import TGateState

HOOK_NAME = "tgate"


def apply_tgate(target, config: TGateConfig, state: TGateState | None = None, *, deepcache=None):
    """Gate a model or a diffusers pipeline.

    - A diffusers pipeline (`StableDiffusionXLPipeline`, img2img, ControlNet, PixArt, SVD,
      ...): every later `pipe(...)` call runs with T-GATE (optionally with DeepCache,
      `deepcache=tgate.DeepCacheConfig(...)`). Returns a `tgate.PipelineGate` handle;
      `handle.remove()` or `remove_tgate(pipe)` restores the plain pipeline.
    - A model (native DiT / LDM U-Net, a diffusers denoiser driven by our sampler): wraps
      its attention modules and returns the `TGateState` that drives them. Give `state`
      to let several models (T-Stitch) follow one schedule. The driver calls
      `state.start(use_cfg)` per sampling run and `state.step(s)` per step; without that
      the wrapped model computes exactly what it computed before.
    """
    from .pipelines import gate_pipeline, is_pipeline

    if is_pipeline(target):
        if state is not None:
            raise ValueError("tgate: a pipeline drives its own schedule; pass no state")
        return gate_pipeline(target, config, deepcache)
    if deepcache is not None:
        raise ValueError("tgate: deepcache= needs a diffusers pipeline (DeepCache wraps pipe.unet)")
    return gate_attention(target, config, state)


def gate_attention(model: nn.Module, config: TGateConfig, state: TGateState | None = None) -> TGateState:
    """Wrap the attention modules of `model`; returns the state that drives them.

    With `config.cache_attention` False no module is wrapped: the state only drives guidance
    truncation. Joint attention (SD3's MM-DiT blocks, `diffusion.attention.is_joint_attention`)
    is never caught by the self-attention rules: a model that has it is refused here."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tgate: expected a torch module or a diffusers pipeline, got {type(model).__name__}")
    if state is None:
        state = TGateState(config)
    elif state.config != config:
        raise ValueError(f"state was made for {state.config}, not {config}")
    if not config.cache_attention:
        return state  # guidance truncation alone: nothing to wrap
    found = list(find_attention(model))
    joint = [name for name, module in found if is_joint_attention(module)]
    if joint:
        raise ValueError(f"tgate: {type(model).__name__} has joint attention (image and text tokens in one attention, "
                         f"e.g. {joint[0]!r}; {len(joint)} such modules), which is neither T-GATE's cross- nor its "
                         f"self-attention, so no caching rule applies; use guidance truncation alone: "
                         f"TGateConfig(cache_attention=False, branch='cond') (configs: accel=tgate_sd3), or accel=none")
    if not found:
        raise ValueError(f"tgate: {type(model).__name__} has no attention module marked with is_cross_attention")
    for name, module in found:
        if getattr(module, "residual_connection", False):
            # its output includes the residual, so a cached output would replay a stale input
            raise ValueError(f"tgate: attention module {name!r} adds its own residual; only modules whose output "
                             "is the attention branch alone can be gated")
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            raise ValueError(f"tgate is already applied to {name!r}; remove_tgate first")
    for name, module in found:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        hook = AttentionGateHook(state, name or type(module).__name__, cross=module.is_cross_attention)
        registry.register_hook(hook, HOOK_NAME)
        state.module_hooks.append(hook)
    return state


def remove_tgate(target) -> None:
    """Undo apply_tgate on a model or a pipeline: no hook or hook state left behind."""
    from .pipelines import is_pipeline, ungate_pipeline

    if is_pipeline(target):
        ungate_pipeline(target)
    else:
        ungate_attention(target)


def ungate_attention(model: nn.Module) -> None:
    """The attention modules' own forward again, no hook state left on them."""
    for _, module in find_attention(model):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or registry.get_hook(HOOK_NAME) is None:
            continue
        hook = registry.get_hook(HOOK_NAME)
        registry.remove_hook(HOOK_NAME, recurse=False)
        if hook in hook.state.module_hooks:
            hook.state.module_hooks.remove(hook)
        hook.cache = None
        if not registry.hooks:
            # the registry leaves the original bound method as an instance attribute; drop it
            # (and the empty registry) so the module is as it was
            if getattr(module.forward, "__func__", None) is type(module).forward:
                del module.forward
            del module._diffusers_hook


def is_gated(target) -> bool:
    from .pipelines import gate_of, is_pipeline

    if is_pipeline(target):
        return gate_of(target) is not None
    return any(getattr(getattr(m, "_diffusers_hook", None), "get_hook", lambda _: None)(HOOK_NAME) is not None
               for _, m in find_attention(target))
