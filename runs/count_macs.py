"""MACs of one image over a whole sampling run, plain and with T-GATE, on `meta`.

The real module code runs with the real gating hooks (the same `TGateHook` the sampler
uses), so reused attention modules cost nothing and truncated guidance runs B rows;
nothing is allocated, so full-size SD-XL and PixArt count in seconds.

Model configs: native ones (`dit.build_dit`) are built as `scripts/sample.py` builds
them; text-to-image ones carry their published architecture under `arch` and are
built as `_target_(**arch)` (see configs/model/sdxl.yaml).

Runs: the steps and guidance scale of `sampler` (a native solver); with `sampler=pipeline`
those of the pipeline call (`model.call`, overridden by `sampler.steps` / `sampler.cfg_scale`),
a CFG batch when the scale is > 1 unless the model embeds its guidance (`model.cfg_batch:
false`, FLUX.1). A stitched run counts `accel.models` + `model` with the accel's hooks
(e.g. `+exp=sd35_stitch_0.4`: SD3.5 Medium for its steps, then SD3.5 Large).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from diffusion.context import SamplingPlan
from diffusion.errors import UserError
from diffusion.macs import count_macs, count_sampling_macs
from diffusion.sampler import check_cfg_scale
from diffusion.solvers import NoiseSchedule, build_solver
from runs.run import build_denoiser, build_hooks, model_configs, model_names
from runs.techniques import label


def build_meta_denoiser(model_cfg: DictConfig) -> nn.Module:
    """The model of `model_cfg` with meta weights, at its native latent size."""
    with torch.device("meta"):
        if "arch" in model_cfg:
            arch = OmegaConf.to_container(model_cfg.arch, resolve=True)
            return get_class(model_cfg._target_)(**arch).eval()
        if model_cfg.get("kind") == "pipeline":  # e.g. SSD-1B, T-Stitch's partner of SD-XL: no published layout here
            raise UserError(f"model {model_cfg.name!r} has no `arch` in its config (configs/model/): its MACs "
                            "cannot be counted; count the large model alone (accel=none) or a pair whose configs "
                            "carry `arch`")
        # native models: exactly as scripts/sample.py builds them
        return build_denoiser(model_cfg, latent_size(model_cfg), pretrained=False, device="meta")


def latent_size(model_cfg: DictConfig) -> int:
    factor = int(model_cfg.get("latent_factor", 8))
    if int(model_cfg.image_size) % factor:
        raise UserError(f"model.image_size={model_cfg.image_size} must be a multiple of {factor}")
    return int(model_cfg.image_size) // factor


def denoiser_inputs(model: nn.Module, model_cfg: DictConfig, rows: int) -> tuple[tuple, dict]:
    """Placeholder inputs of the shapes the model's pipeline feeds it, `rows` batch rows."""
    from diffusers import (
        DiTTransformer2DModel,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

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
    if isinstance(model, SD3Transformer2DModel):  # SD3 / SD3.5: (CLIP + T5) joint-attention context, pooled CLIP
        c = model.config
        x = torch.zeros(rows, c.in_channels, size, size, **meta)
        text = torch.zeros(rows, int(model_cfg.text_length), c.joint_attention_dim, **meta)
        pooled = torch.zeros(rows, c.pooled_projection_dim, **meta)
        return (), {"hidden_states": x, "timestep": t, "encoder_hidden_states": text, "pooled_projections": pooled}
    if isinstance(model, FluxTransformer2DModel):  # FLUX.1: the latent packed into 2x2 patches, one token each
        c = model.config
        tokens, length = (size // 2) ** 2, int(model_cfg.text_length)
        kwargs = {"hidden_states": torch.zeros(rows, tokens, c.in_channels, **meta), "timestep": t,
                  "encoder_hidden_states": torch.zeros(rows, length, c.joint_attention_dim, **meta),
                  "pooled_projections": torch.zeros(rows, c.pooled_projection_dim, **meta),
                  "img_ids": torch.zeros(tokens, 3, **meta), "txt_ids": torch.zeros(length, 3, **meta)}
        if c.guidance_embeds:  # the embedded guidance scale, one per row
            kwargs["guidance"] = torch.zeros(rows, **meta)
        return (), kwargs
    if isinstance(model, DiTTransformer2DModel):
        x = torch.zeros(rows, model.config.in_channels, size, size, **meta)
        return (x,), {"timestep": t, "class_labels": torch.zeros(rows, dtype=torch.long, **meta)}
    if hasattr(model, "num_classes") and hasattr(model, "in_channels"):  # native DiT: model(x, t, y)
        x = torch.zeros(rows, model.in_channels, size, size, **meta)
        y = torch.zeros(rows, dtype=torch.long, **meta)
        return (x, t), {model_cfg.get("cond_key", "y"): y}
    raise UserError(f"cannot make counting inputs for {type(model).__name__}")


def count_run(models: list[nn.Module], model_cfgs: list[DictConfig], num_steps: int, use_cfg: bool,
              hooks=(), timesteps=None) -> dict:
    """MACs for one image over num_steps (the CFG batch included while guidance runs).

    timesteps: the model timestep of each step, when known (a native solver's); unknown ones (a
    pipeline's own scheduler) are None, and hooks that need them (T-Stitch's timestep rule) refuse."""
    steps = tuple(timesteps) if timesteps is not None else (None,) * num_steps
    plan = SamplingPlan(num_steps, len(models), 1, 2.0 if use_cfg else 1.0, use_cfg, steps)

    def count_step(ctx, rows: int) -> dict[str, int]:
        model, model_cfg = models[ctx.model_index], model_cfgs[ctx.model_index]
        args, kwargs = denoiser_inputs(model, model_cfg, rows)
        with torch.no_grad():
            return count_macs(lambda: model(*args, **kwargs))

    return count_sampling_macs(count_step, plan, hooks)


def run_settings(cfg: DictConfig) -> tuple[int, float, bool]:
    """(steps, guidance scale, CFG batch) of the run `cfg` describes (see the module docstring)."""
    pipeline = cfg.model.get("kind") == "pipeline"
    cfg_batch = bool(cfg.model.get("cfg_batch", True))  # false: the model embeds its guidance scale (FLUX.1)
    if cfg.sampler.name != "pipeline":  # a native solver's settings (for a pipeline model: its steps and scale only)
        scale = check_cfg_scale(cfg.sampler.cfg_scale)
        return int(cfg.sampler.steps), scale, cfg_batch and (scale > 1 if pipeline else scale != 1.0)
    if not pipeline:
        raise UserError(f"sampler=pipeline counts a diffusers pipeline's call, but model {cfg.model.name!r} is "
                         "native; use a native sampler (ddim, ddpm, dpmpp_2m, euler)")
    from runs.pipeline_run import call_arguments

    call = call_arguments(cfg)
    steps, scale = call.get("num_inference_steps"), call.get("guidance_scale")
    if steps is None or scale is None:
        raise UserError(f"model {cfg.model.name!r}: give sampler.steps and sampler.cfg_scale (its model.call has "
                         f"num_inference_steps={steps}, guidance_scale={scale})")
    return int(steps), float(scale), cfg_batch and scale > 1  # diffusers pipelines: CFG batch iff scale > 1


def count_config(cfg: DictConfig) -> dict:
    """Baseline (`model` alone, no hooks) and accelerated (accel.models + model, accel.hooks)
    MACs for one image, as scripts/sample.py would run `cfg` (composed from configs/macs.yaml)."""
    num_steps, _, use_cfg = run_settings(cfg)
    hooks = build_hooks(cfg)  # bad settings fail here, before any model is built
    if cfg.sampler.name == "pipeline":
        # the pipeline's own scheduler runs (flow matching, DPM++, ...): hooks see the step count, no learned variance
        solver, timesteps = SimpleNamespace(num_steps=num_steps, learned_variance=False), None
    else:
        solver = build_solver(cfg.sampler.name, cfg.sampler.steps, NoiseSchedule(**cfg.schedule),
                              learned_variance=bool(cfg.model.get("learn_sigma", False)),
                              eta=cfg.sampler.get("eta", 0.0), spacing=cfg.sampler.get("spacing"))
        timesteps = solver.reset()[1].tolist()
    configs = model_configs(cfg)
    models = [build_meta_denoiser(c) for c in configs]
    baseline = count_run(models[-1:], configs[-1:], solver.num_steps, use_cfg)
    for hook in hooks:
        hook.attach(models, model_names(configs), solver)
    try:
        accelerated = count_run(models, configs, solver.num_steps, use_cfg, hooks, timesteps)
    finally:
        for hook in hooks:
            hook.detach()
    return {"baseline": baseline, "accelerated": accelerated}


def format_table(cfg: DictConfig, result: dict) -> str:
    """The counts as a small text table, in T (10^12) MACs, with the speed-up they predict."""
    base = result["baseline"]
    _, scale, use_cfg = run_settings(cfg)
    names = " -> ".join(str(c.name) for c in model_configs(cfg))
    head = (f"{cfg.model.name}, {cfg.sampler.name} x{len(base['per_step'])} steps, cfg_scale {scale:g}"
            f"{'' if use_cfg else ' (no CFG batch)'}, accel={label(cfg.accel)} ({names}); MACs for one image")
    lines = [head, f"{'':12s} {'paper (T)':>10s} {'all ops (T)':>12s} {'speed-up':>9s}"]
    for key, row in result.items():
        lines.append(f"{key:12s} {row['macs_paper'] / 1e12:10.3f} {row['macs_all'] / 1e12:12.3f} "
                     f"{base['macs_all'] / row['macs_all']:8.2f}x")
    lines.append("paper = without the attention score/value matmuls (the T-GATE tables' convention)")
    caches = [k for k in (cfg.accel.get("hooks") or {}) if str(cfg.accel.hooks[k].get("_target_", "")).startswith(
        "caches.")]
    if caches:  # they decide from activations (or per call): nothing to decide on `meta`
        lines.append(f"{', '.join(caches)}: counted here as the plain model; the MACs a run really spends are in its "
                     "metrics.json (macs_per_image_spent, cache_blocks_computed_per_image)")
    return "\n".join(lines)
