"""MACs of one image over a whole sampling run, plain and with T-GATE, on `meta`.

The real module code runs with the real gating hooks (the same `TGateHook` the sampler
uses), so reused attention modules cost nothing and truncated guidance runs B rows;
nothing is allocated, so full-size SD-XL and PixArt count in seconds.

Model configs: native ones (`dit.build_dit`) are built as `scripts/sample.py` builds
them; text-to-image ones carry their published architecture under `arch` and are
built as `_target_(**arch)` (see configs/model/sdxl.yaml).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from diffusion.macs import count_macs, count_sampling_macs
from diffusion.context import SamplingPlan

from .hook import TGateHook


def build_meta_denoiser(model_cfg: DictConfig) -> nn.Module:
    """The model of `model_cfg` with meta weights, at its native latent size."""
    with torch.device("meta"):
        if "arch" in model_cfg:
            arch = OmegaConf.to_container(model_cfg.arch, resolve=True)
            return get_class(model_cfg._target_)(**arch).eval()
        from diffusion.run import build_denoiser  # native models: exactly as sampling builds them

        return build_denoiser(model_cfg, latent_size(model_cfg), pretrained=False, device="meta")


def latent_size(model_cfg: DictConfig) -> int:
    factor = int(model_cfg.get("latent_factor", 8))
    if int(model_cfg.image_size) % factor:
        raise ValueError(f"model.image_size={model_cfg.image_size} must be a multiple of {factor}")
    return int(model_cfg.image_size) // factor


def denoiser_inputs(model: nn.Module, model_cfg: DictConfig, rows: int) -> tuple[tuple, dict]:
    """Placeholder inputs of the shapes the model's pipeline feeds it, `rows` batch rows."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    size = latent_size(model_cfg)
    meta = dict(device="meta")
    t = torch.zeros(rows, **meta)
    if isinstance(model, UNet2DConditionModel):
        c = model.config
        x = torch.zeros(rows, c.in_channels, size, size, **meta)
        text = torch.zeros(rows, int(model_cfg.text_length), c.cross_attention_dim, **meta)
        kwargs = {"encoder_hidden_states": text}
        if c.addition_embed_type == "text_time":  # SD-XL: pooled text embedding + 6 size/crop ids
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(rows, pooled, **meta),
                                           "time_ids": torch.zeros(rows, 6, **meta)}
        if c.time_cond_proj_dim is not None:  # LCM: guidance-scale embedding
            kwargs["timestep_cond"] = torch.zeros(rows, c.time_cond_proj_dim, **meta)
        return (x, t), kwargs
    if isinstance(model, PixArtTransformer2DModel):
        c = model.config
        x = torch.zeros(rows, c.in_channels, size, size, **meta)
        text = torch.zeros(rows, int(model_cfg.text_length), c.caption_channels, **meta)
        extra = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArt-alpha 1024: (height, width) and aspect ratio
            extra = {"resolution": torch.zeros(rows, 2, **meta), "aspect_ratio": torch.zeros(rows, 1, **meta)}
        return (x,), {"encoder_hidden_states": text, "timestep": t, "added_cond_kwargs": extra}
    if isinstance(model, DiTTransformer2DModel):
        x = torch.zeros(rows, model.config.in_channels, size, size, **meta)
        return (x,), {"timestep": t, "class_labels": torch.zeros(rows, dtype=torch.long, **meta)}
    if hasattr(model, "num_classes") and hasattr(model, "in_channels"):  # native DiT: model(x, t, y)
        x = torch.zeros(rows, model.in_channels, size, size, **meta)
        y = torch.zeros(rows, dtype=torch.long, **meta)
        return (x, t), {model_cfg.get("cond_key", "y"): y}
    raise ValueError(f"cannot make counting inputs for {type(model).__name__}")


class StepCounter:
    """count_step for `count_sampling_macs`: FlopCounterMode over the real forward on meta.

    A meta forward of SD-XL takes ~2 s (meta kernels run in Python), and most steps of a
    run repeat an earlier one exactly: same model, rows, gate actions, and the same
    cache shapes in every gated module. Such a step is not run again: its count is
    reused and the caches are set to what that forward left (meta tensors: shapes
    only), so later steps see exactly the state a real run would give them.
    """

    def __init__(self, models: list[nn.Module], model_cfgs: list[DictConfig], states=()):
        self.models, self.model_cfgs = models, model_cfgs
        self.module_hooks = [h for state in states for h in state.module_hooks]
        self.states = list(states)
        self.memo: dict = {}
        self.forwards = 0  # forwards actually run (the rest were repeats)

    def _caches(self) -> tuple:
        return tuple(None if h.cache is None else tuple(h.cache.shape) for h in self.module_hooks)

    def __call__(self, ctx, rows: int) -> dict[str, int]:
        key = (ctx.model_index, rows, tuple(s.actions for s in self.states), self._caches())
        if key in self.memo:
            macs, after = self.memo[key]
            for hook, cache in zip(self.module_hooks, after):
                hook.cache = cache
            return macs
        model, model_cfg = self.models[ctx.model_index], self.model_cfgs[ctx.model_index]
        args, kwargs = denoiser_inputs(model, model_cfg, rows)
        with torch.no_grad():
            macs = count_macs(lambda: model(*args, **kwargs))
        self.forwards += 1
        self.memo[key] = (macs, [h.cache for h in self.module_hooks])
        return macs


def count_run(models: list[nn.Module], model_cfgs: list[DictConfig], num_steps: int, use_cfg: bool,
              hooks=()) -> dict:
    """MACs for one image over num_steps (the CFG batch included while guidance runs)."""
    plan = SamplingPlan(num_steps, len(models), 1, 2.0 if use_cfg else 1.0, use_cfg, tuple(range(num_steps)))
    states = [h.state for h in hooks if isinstance(h, TGateHook)]
    return count_sampling_macs(StepCounter(models, model_cfgs, states), plan, hooks)


def count_tgate(model_cfg: DictConfig, num_steps: int, use_cfg: bool, tgate: dict | None) -> dict:
    """{"baseline": ..., "accelerated": ...} for one model; tgate: TGateHook settings (None: baseline only)."""
    model = build_meta_denoiser(model_cfg)
    result = {"baseline": count_run([model], [model_cfg], num_steps, use_cfg)}
    if tgate is not None:
        hook = TGateHook(**tgate)
        hook.attach([model], [str(model_cfg.name)], None)
        try:
            result["accelerated"] = count_run([model], [model_cfg], num_steps, use_cfg, [hook])
        finally:
            hook.detach()
    return result
