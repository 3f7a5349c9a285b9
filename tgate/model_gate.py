"""T-GATE on a model's own attention modules: wrap them with the gate hooks, unwrap them again.

Attention modules are found by their `is_cross_attention` marker (native models set it via
`diffusion.attention.mark_attention`; diffusers' `Attention` has it natively), so this module
knows no model class. Whoever drives the schedule (the sampler-level `TGateHook`, a pipeline's
`PipelineGate`, a user's own loop) sets the steps on the returned `TGateState`.
"""
from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry

from diffusion.attention import find_attention, is_joint_attention
from diffusion.errors import UserError

from .config import TGateConfig
from .module_hook import AttentionGateHook
from .state import TGateState

HOOK_NAME = "tgate"


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
        raise UserError(f"state was made for {state.config}, not {config}")
    if not config.cache_attention:
        return state  # guidance truncation alone: nothing to wrap
    found = list(find_attention(model))
    joint = [name for name, module in found if is_joint_attention(module)]
    if joint:
        raise UserError(f"tgate: {type(model).__name__} has joint attention (image and text tokens in one attention, "
                         f"e.g. {joint[0]!r}; {len(joint)} such modules), which is neither T-GATE's cross- nor its "
                         f"self-attention, so no caching rule applies; use guidance truncation alone: "
                         f"TGateConfig(cache_attention=False, branch='cond') (configs: accel=tgate on an MM-DiT, "
                         f"configs/family/sd35_large.yaml), or accel=none")
    if not found:
        raise UserError(f"tgate: {type(model).__name__} has no attention module marked with is_cross_attention")
    for name, module in found:
        if getattr(module, "residual_connection", False):
            # its output includes the residual, so a cached output would replay a stale input
            raise UserError(f"tgate: attention module {name!r} adds its own residual; only modules whose output "
                             "is the attention branch alone can be gated")
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            raise UserError(f"tgate is already applied to {name!r}; remove_tgate first")
    for name, module in found:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        hook = AttentionGateHook(state, name or type(module).__name__, cross=module.is_cross_attention)
        registry.register_hook(hook, HOOK_NAME)
        state.module_hooks.append(hook)
    return state


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


def is_model_gated(model: nn.Module) -> bool:
    """Whether any attention module of `model` carries the T-GATE hook."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "get_hook", lambda _: None)(HOOK_NAME) is not None
               for _, m in find_attention(model))
