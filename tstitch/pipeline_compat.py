"""Refuse diffusers denoiser pairs that cannot share one pipeline's trajectory and inputs.

The pipeline prepares every input for its own (large) denoiser: latents of its channel
count and size, text embeddings of its width, SD-XL's added conditioning (pooled text +
time ids) of its width, and, with a ControlNet, residuals shaped for its down blocks.
A model that runs in its place must take the same inputs.
"""
from __future__ import annotations

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
}


def _config(model) -> dict:
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
    for i, (width, n) in enumerate(zip(widths, layers)):
        channels += [width] * n + ([width] if i < len(widths) - 1 else [])
    return channels, widths[-1]


def check_denoiser_pair(small, large, small_name: str = "small", large_name: str = "large",
                        controlnet: bool = False) -> None:
    """Raise ValueError naming the first input the two denoisers disagree on, with both values."""
    if type(small).__name__ != type(large).__name__:
        raise ValueError(f"cannot stitch {small_name} into {large_name}: different denoiser classes: "
                         f"{small_name} is {type(small).__name__}, {large_name} is {type(large).__name__}")
    a, b = _config(small), _config(large)
    for key, what in CHECKED_KEYS.items():
        if key not in a and key not in b:
            continue
        va, vb = _value(a, key), _value(b, key)
        if va != vb:
            raise ValueError(f"cannot stitch {small_name} into {large_name}: different {what}: "
                             f"{small_name} has {key}={va!r}, {large_name} has {key}={vb!r}")
    # LCM's guidance embedding: a model without it runs without it; two different widths cannot both take it
    ta, tb = a.get("time_cond_proj_dim"), b.get("time_cond_proj_dim")
    if ta is not None and tb is not None and ta != tb:
        raise ValueError(f"cannot stitch {small_name} into {large_name}: different guidance-embedding widths: "
                         f"{small_name} has time_cond_proj_dim={ta}, {large_name} has time_cond_proj_dim={tb}")
    if controlnet and "block_out_channels" in a:
        ra, rb = down_residual_channels(a), down_residual_channels(b)
        if ra != rb:
            raise ValueError(f"cannot stitch {small_name} into {large_name} under a ControlNet: the ControlNet's "
                             f"residuals fit {large_name}'s blocks: {small_name} takes (down, mid) residual "
                             f"channels {ra}, {large_name} {rb}")
