"""apply_tgate / remove_tgate: gate every marked attention module of a model, from outside.

Attention modules are found by their `is_cross_attention` marker (native models set
it via `diffusion.attention.mark_attention`; diffusers' `Attention` has it natively),
so this module knows no model class.
"""
from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry

from diffusion.attention import find_attention

from .config import TGateConfig
from .module_hook import AttentionGateHook
from .state import TGateState

HOOK_NAME = "tgate"


def apply_tgate(model: nn.Module, config: TGateConfig, state: TGateState | None = None) -> TGateState:
    """Wrap the attention modules of `model`; returns the state that drives them.

    Give `state` to let several models (T-Stitch) follow one schedule. The driver calls
    `state.start(use_cfg)` per sampling run and `state.step(s)` per step; without
    that the wrapped model computes exactly what it computed before.
    """
    if state is None:
        state = TGateState(config)
    elif state.config != config:
        raise ValueError(f"state was made for {state.config}, not {config}")
    found = list(find_attention(model))
    if not found:
        raise ValueError(f"tgate: {type(model).__name__} has no attention module marked with is_cross_attention")
    for name, module in found:
        if getattr(module, "residual_connection", False):
            # its output includes the residual, so a cached output would replay a stale input
            raise ValueError(f"tgate: attention module {name!r} adds its own residual; only modules whose output "
                             "is the attention branch alone can be gated")
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(HOOK_NAME) is not None:
            raise ValueError(f"tgate is already applied to {name!r}; remove_tgate first")
        hook = AttentionGateHook(state, name or type(module).__name__, cross=module.is_cross_attention)
        registry.register_hook(hook, HOOK_NAME)
        state.module_hooks.append(hook)
    return state


def remove_tgate(model: nn.Module) -> None:
    """Undo apply_tgate: the modules' own forward again, no hook state left on them."""
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


def is_gated(model: nn.Module) -> bool:
    return any(getattr(getattr(m, "_diffusers_hook", None), "get_hook", lambda _: None)(HOOK_NAME) is not None
               for _, m in find_attention(model))
