"""Refuse diffusers denoiser pairs that cannot share one pipeline's trajectory and inputs.

The pipeline prepares every input for its own (large) denoiser: latents of its channel
count and size, text embeddings of its width, SD-XL's added conditioning (pooled text +
time ids) of its width, and, with a ControlNet, residuals shaped for its down blocks.
MM-DiT pipelines (SD3 / SD3.5, FLUX.1) hand their transformer the text context of the joint
attention (`joint_attention_dim` wide), a pooled text embedding (`pooled_projection_dim`)
and, for FLUX.1-dev, the guidance scale as an input (`guidance_embeds`).
A model that runs in its place must take the same inputs.
"""
from __future__ import annotations

from diffusion.errors import UserError

# config key -> what it means, for the error message; compared when either model has it
CHECKED_KEYS = {
    "in_channels": "latent channels",
    "out_channels": "output channels",
    "sample_size": "sample sizes (latent resolution)",
    "cross_attention_dim": "cross-attention widths (text embedding width)",
    "caption_channels": "caption (text embedding) widths",
    "encoder_hid_dim": "text projection widths (encoder_hid_dim)",
    "addition_embed_type": "added-conditioning types (addition_embed_type)",
    "projection_class_embeddings_input_dim": "added-conditioning widths (projection_class_embeddings_input_dim)",
    "addition_time_embed_dim": "added time-id embedding widths (addition_time_embed_dim)",
    "class_embed_type": "class-embedding types",
    "num_class_embeds": "class counts",
    "use_additional_conditions": "micro-conditioning (use_additional_conditions)",
    "joint_attention_dim": "joint-attention text-context widths (joint_attention_dim)",
    "pooled_projection_dim": "pooled text-embedding widths (pooled_projection_dim)",
    "guidance_embeds": "guidance inputs (guidance_embeds: the pipeline passes the guidance scale to a model "
                       "that embeds it)",
}


def _class_name(model) -> str:
    """A module's class name, or `_class_name` of a denoiser's config.json read as a dict."""
    if isinstance(model, dict):
        return str(model.get("_class_name"))
    return type(model).__name__


def _config(model) -> dict:
    if isinstance(model, dict):  # a config.json, read before the weights are loaded
        return model
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no diffusers `config`; stitching in a pipeline needs diffusers "
                        "denoisers (UNet2DConditionModel, PixArtTransformer2DModel, ...)")
    return dict(config)


def _value(config: dict, key: str):
    value = config.get(key)
    return tuple(value) if isinstance(value, list) else value


def down_residual_channels(config: dict) -> tuple[list[int], int]:
    """Channels of the residuals a ControlNet adds to a UNet: one per down-block output
    (conv_in, every resnet, every downsampler) and the mid block's."""
    widths = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(widths) if isinstance(layers, int) else list(layers)
    channels = [widths[0]]
    for i, (width, n) in enumerate(zip(widths, layers, strict=False)):
        channels += [width] * n + ([width] if i < len(widths) - 1 else [])
    return channels, widths[-1]


def _differences(a: dict, b: dict) -> list[tuple[str, str, object, object]]:
    """(key, what, small's value, large's value) for every checked input the two configs disagree on."""
    found = []
    for key, what in CHECKED_KEYS.items():
        if key not in a and key not in b:
            continue
        va, vb = _value(a, key), _value(b, key)
        if va != vb:
            found.append((key, what, va, vb))
    return found


def check_denoiser_pair(small, large, small_name: str = "small", large_name: str = "large",
                        controlnet: bool = False) -> None:
    """Raise ValueError naming the first input the two denoisers disagree on, with both values.

    small / large: denoiser modules, or (small only) its config.json as a dict, so that a model
    can be refused before its weights are downloaded."""
    if _class_name(small) != _class_name(large):
        # e.g. SD3.5 with SD-XL's UNet, FLUX.1 with SD3: say which inputs differ, not only the class
        configs = [m if isinstance(m, dict) else dict(getattr(m, "config", None) or {}) for m in (small, large)]
        inputs = ", ".join(f"{key}={va!r} vs {vb!r}" for key, _, va, vb in _differences(*configs)
                           if va is not None and vb is not None)
        raise UserError(f"cannot stitch {small_name} into {large_name}: different denoiser classes: "
                         f"{small_name} is {_class_name(small)}, {large_name} is {_class_name(large)}"
                         + (f" (their inputs differ too: {inputs})" if inputs else ""))
    a, b = _config(small), _config(large)
    for key, what, va, vb in _differences(a, b)[:1]:
        raise UserError(f"cannot stitch {small_name} into {large_name}: different {what}: "
                         f"{small_name} has {key}={va!r}, {large_name} has {key}={vb!r}")
    # LCM's guidance embedding: a model without it runs without it; two different widths cannot both take it
    ta, tb = a.get("time_cond_proj_dim"), b.get("time_cond_proj_dim")
    if ta is not None and tb is not None and ta != tb:
        raise UserError(f"cannot stitch {small_name} into {large_name}: different guidance-embedding widths: "
                         f"{small_name} has time_cond_proj_dim={ta}, {large_name} has time_cond_proj_dim={tb}")
    if controlnet and "block_out_channels" in a:
        ra, rb = down_residual_channels(a), down_residual_channels(b)
        if ra != rb:
            raise UserError(f"cannot stitch {small_name} into {large_name} under a ControlNet: the ControlNet's "
                             f"residuals fit {large_name}'s blocks: {small_name} takes (down, mid) residual "
                             f"channels {ra}, {large_name} {rb}")
