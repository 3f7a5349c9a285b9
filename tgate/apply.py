"""apply_tgate / remove_tgate / is_gated: T-GATE on a model's attention modules, or on a whole diffusers pipeline.

A model is handed to `tgate.model_gate` (wrap its attention modules; the caller drives the
schedule), a diffusers pipeline to `tgate.pipelines` (which gates its denoiser with the same
`tgate.model_gate` and drives the schedule from the pipeline's own calls). Both import only
downwards, so neither imports this module.
"""
from __future__ import annotations

from diffusion.errors import UserError

from .config import TGateConfig
from .model_gate import HOOK_NAME, gate_attention, is_model_gated, ungate_attention
from .pipelines import gate_of, gate_pipeline, is_pipeline, ungate_pipeline
from .state import TGateState

__all__ = ["HOOK_NAME", "apply_tgate", "gate_attention", "is_gated", "remove_tgate", "ungate_attention"]


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
    if is_pipeline(target):
        if state is not None:
            raise UserError("tgate: a pipeline drives its own schedule; pass no state")
        return gate_pipeline(target, config, deepcache)
    if deepcache is not None:
        raise UserError("tgate: deepcache= needs a diffusers pipeline (DeepCache wraps pipe.unet)")
    return gate_attention(target, config, state)


def remove_tgate(target) -> None:
    """Undo apply_tgate on a model or a pipeline: no hook or hook state left behind."""
    if is_pipeline(target):
        ungate_pipeline(target)
    else:
        ungate_attention(target)


def is_gated(target) -> bool:
    """Whether apply_tgate is in effect on a pipeline, or on any attention module of a model."""
    if is_pipeline(target):
        return gate_of(target) is not None
    return is_model_gated(target)
