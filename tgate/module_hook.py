"""The wrapper around one attention module: compute, cache, or reuse its output.

A `diffusers.hooks.ModelHook`, so it works on any `nn.Module` (native DiT's timm
`Attention`, diffusers' `Attention`) without touching the module's own code. What is
cached is the module's output: after the output projection, before the residual add
that the enclosing block does.

Under torch.compile the per-step decision stays eager (`torch.compiler.disable`): traced, each action
and "cache present" would be a guard and the set of graphs would grow with the decisions a run reaches.
The attention itself is compiled as its own region when the compile layer asks (`compile_inner`).
"""
from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from diffusion.compile import kept

from .schedule import Action
from .state import TGateState


def _hidden_states(args, kwargs) -> torch.Tensor:
    """The module's first input (timm: x; diffusers: hidden_states), (rows, tokens, dim)."""
    if args:
        return args[0]
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise TypeError("gated attention module called without its hidden states")


class AttentionGateHook(ModelHook):
    _is_stateful = True  # diffusers' reset_stateful_hooks drops the cache too

    def __init__(self, state: TGateState, name: str, cross: bool):
        super().__init__()
        self.state = state
        self.name = name  # qualified module name, for error messages
        self.cross = cross
        self.cache: torch.Tensor | None = None
        self.inner = None  # the module's own forward, compiled (compile_inner); None: fn_ref.original_forward

    def compile_inner(self, compile_method) -> None:
        """compile=regional/full: the attention module's own forward as a compiled region of its own."""
        self.inner = compile_method(self.fn_ref.original_forward)

    @torch.compiler.disable  # the decision is eager; the work (self.inner) may be compiled
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        actions = self.state.actions
        action = actions.cross_attn if self.cross else actions.self_attn
        if action is Action.REUSE:
            if self.cache is not None:
                rows = _hidden_states(args, kwargs).shape[0]
                if self.cache.shape[0] != rows:
                    raise RuntimeError(f"tgate: {self.name} would reuse a cached output of {self.cache.shape[0]} rows "
                                       f"for an input of {rows} rows; was the CFG batch changed mid-run?")
                return self.cache
            # a model asked to reuse what it never computed (e.g. stitched in after the gate
            # step): compute now and cache, so its later reuse steps have something to reuse
            action = Action.CACHE
        out = (self.inner or self.fn_ref.original_forward)(*args, **kwargs)
        if action is Action.CACHE:
            self.cache = kept(out)
        elif action is Action.CACHE_CFG_MEAN:
            first, second = out.chunk(2)  # the two CFG halves, B rows each (their order does not matter)
            self.cache = (first + second) / 2
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache = None
        return module
