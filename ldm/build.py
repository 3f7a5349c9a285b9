"""Class-conditional LDMs and their first stages from Hydra configs (configs/model/ldm_*.yaml,
configs/vae/vq_*.yaml).

A model config carries the CompVis yaml's `unet_config.params` (`unet`) and
`cond_stage_config` (`cond_stage`) inline, so random-weight runs need no file; a
`compvis_config` path (the yaml shipped with a checkpoint) replaces both.
"""
from __future__ import annotations

import os

from diffusion.errors import UserError
from diffusion.vae import FirstStage

from .compvis import (
    FIRST_STAGE_PREFIX,
    build_class_conditional_ldm,
    load_compvis_state_dict,
    read_compvis_config,
    split_prefix,
)
from .conditioning import ClassConditionalLDM
from .first_stage import (
    first_stage_from_diffusers_model,
    first_stage_kwargs,
    ldm_scale_factor,
    load_first_stage_from_compvis,
)

# where the public CompVis checkpoints live (downloads are left to the user: they are large)
KNOWN_CHECKPOINTS = {
    "LDM-cin256-v2": "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt "
                     "(with configs/latent-diffusion/cin256-v2.yaml)",
}


def compvis_parts(compvis_config, unet, cond_stage) -> tuple[dict, dict, dict | None]:
    """(unet params, cond_stage_config, full CompVis params or None) from a yaml path or the inline blocks."""
    if compvis_config:
        params = read_compvis_config(compvis_config)
        return params["unet_config"]["params"], params.get("cond_stage_config"), params
    if unet is None or cond_stage is None:
        raise UserError("an LDM model config needs `unet` and `cond_stage` (CompVis unet_config.params and "
                         "cond_stage_config) or `compvis_config` (a CompVis yaml path)")
    return unet, cond_stage, None


def build_ldm(
    name: str = "LDM",
    input_size: int | None = None,
    pretrained: bool = False,
    num_classes: int = 1000,
    ckpt: str | os.PathLike | None = None,
    compvis_config: str | os.PathLike | None = None,
    unet: dict | None = None,
    cond_stage: dict | None = None,
    use_ema: bool | None = None,
) -> ClassConditionalLDM:
    """A class-conditional LDM denoiser `model(x, t, y) -> eps`, in eval mode.

    ckpt: a CompVis `.ckpt` / `.safetensors` holding `model.diffusion_model.*` and
    `cond_stage_model.*` (the first stage is loaded by the `vae` config from the same file).
    pretrained=False: random weights, ckpt ignored. use_ema: load the `model_ema.*` copy
    (None: when the checkpoint has one; CompVis samples with EMA weights when it exists).
    input_size (the latent side the run uses) is not checked against the yaml's
    `image_size`: the U-Net is convolutional, any multiple of its downsampling works.
    """
    unet_params, cond_stage_config, _ = compvis_parts(compvis_config, unet, cond_stage)
    if pretrained and ckpt is None:
        where = KNOWN_CHECKPOINTS.get(name)
        raise UserError(f"model {name!r} needs model.ckpt (a CompVis .ckpt with model.diffusion_model., "
                         f"first_stage_model. and cond_stage_model. weights)"
                         + (f"; the public one: {where}" if where else "") + ", or pretrained=false")
    state = load_compvis_state_dict(ckpt) if pretrained else None
    model = build_class_conditional_ldm(state, unet_params, cond_stage_config, use_ema=use_ema, name=name,
                                        source=str(ckpt))
    if model.num_classes != num_classes:
        raise UserError(f"model.num_classes={num_classes}, but the class embedder has {model.num_classes} classes "
                         f"and a null class ({model.num_classes + 1} rows)")
    return model


def load_first_stage(
    config: dict | None = None,
    scale_factor: float = 1.0,
    ckpt: str | os.PathLike | None = None,
    compvis_config: str | os.PathLike | None = None,
    pretrained: bool = False,
    device="cpu",
) -> FirstStage:
    """The run's first stage (latents -> uint8 images) from an LDM checkpoint's `first_stage_model.*`.

    config: CompVis `first_stage_config` ({target, params}); scale_factor: CompVis's latent scale.
    compvis_config (a CompVis yaml) replaces both. pretrained=False: random weights, ckpt ignored.
    """
    params = read_compvis_config(compvis_config) if compvis_config else None
    if params is not None:
        config = params["first_stage_config"]
    if config is None:
        raise UserError("the LDM first stage needs `config` (CompVis first_stage_config) or `compvis_config`")
    if not pretrained:
        cls, kwargs = first_stage_kwargs(config, scale_factor=scale_factor)
        return first_stage_from_diffusers_model(cls(**kwargs).eval().to(device), scale_factor)
    if ckpt is None:
        raise UserError("vae: the LDM first stage is read from model.ckpt (first_stage_model.* of the CompVis "
                         "checkpoint); set model.ckpt, or pretrained=false for random weights")
    state = load_compvis_state_dict(ckpt)
    if params is not None:
        scale_factor = ldm_scale_factor(params, state)
    weights = split_prefix(state, FIRST_STAGE_PREFIX, str(ckpt))
    model = load_first_stage_from_compvis(weights, config, scale_factor=scale_factor)
    return first_stage_from_diffusers_model(model.to(device), scale_factor)
