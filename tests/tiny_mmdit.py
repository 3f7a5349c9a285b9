"""Tiny random MM-DiT pipelines (StableDiffusion3Pipeline, FluxPipeline), built offline in well under a second.

Laid out as the real ones, only narrow: a 2-level AutoencoderKL with 16 latent channels (downsampling 2,
so a 16x16 image has a 16x8x8 latent), the byte-level CLIP tokenizers and T5 tokenizer of
`tiny_pipelines` (no hub), text encoders in eval mode, and a FlowMatchEulerDiscreteScheduler.

- SD3: CLIP-L and CLIP-G stand-ins (width 32 each, with projection) and a T5 of width 64: the
  pipeline joins the two CLIP hidden states (32 + 32) and pads them to T5's width, so the
  transformer's joint_attention_dim is 64 and its pooled_projection_dim 32 + 32 = 64.
- Flux: one CLIP (pooled width 32) and a T5 of width 32; the transformer sees the 16x8x8 latent
  packed into 2x2 patches: 16 tokens of 64 channels (in_channels=64).

Builders take a seed (same seed, same weights) and size settings, so a "small" and a "large"
model of one family are two calls. diffusers initialises these transformers with random (not zero)
output layers, so their outputs are non-zero and differ between seeds and sizes.
"""
from __future__ import annotations

import torch

from tiny_pipelines import clip_text_encoder, clip_tokenizer, t5_tokenizer

IMAGE_SIZE = 16      # pixels; the latent is 16 x 8 x 8
LATENT_CHANNELS = 16
SD3_T5_WIDTH = 64    # joint_attention_dim of the tiny SD3 transformers
FLUX_T5_WIDTH = 32   # joint_attention_dim of the tiny Flux transformers
MAX_TOKENS = 16      # pass max_sequence_length=MAX_TOKENS: T5 pads to it (the default 256/512 is slow)
PROMPT = "a red fox"


def vae(seed: int = 0):
    """AutoencoderKL with 16 latent channels and SD3's latent scaling and shift (2 levels: downsampling 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609).eval()


def t5_encoder(seed: int, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def flow_scheduler(dynamic: bool = False, shift: float = 3.0):
    """FlowMatchEulerDiscreteScheduler as SD3.5 ships it (shift 3), or with Flux's resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:  # FLUX.1-dev's scheduler config
        return FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=True, base_image_seq_len=256,
                                               max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def sd3_transformer(seed: int = 0, num_layers: int = 2, heads: int = 2, head_dim: int = 8, **overrides):
    """SD3Transformer2DModel on the 16x8x8 latent (patch 2: 16 image tokens); SD3.5's qk RMS norm.
    overrides: e.g. dual_attention_layers=(0,) (SD3.5 Medium's MMDiT-X blocks), pooled_projection_dim=..."""
    from diffusers import SD3Transformer2DModel

    config = dict(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                  num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=SD3_T5_WIDTH, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=2 * 32, pos_embed_max_size=8, qk_norm="rms_norm")
    config.update(overrides)
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**config).eval()


def sd3_pipeline(seed: int = 0, transformer=None, scheduler=None, cls=None):
    """StableDiffusion3Pipeline (or `cls`, e.g. StableDiffusion3Img2ImgPipeline) with tiny random parts.
    Call it with max_sequence_length=MAX_TOKENS."""
    from diffusers import StableDiffusion3Pipeline

    pipe = (cls or StableDiffusion3Pipeline)(
        transformer=transformer if transformer is not None else sd3_transformer(seed),
        scheduler=scheduler if scheduler is not None else flow_scheduler(),
        vae=vae(seed + 1), text_encoder=clip_text_encoder(seed + 2, projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(seed + 3, projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed + 4, SD3_T5_WIDTH), tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, heads: int = 2,
                     guidance_embeds: bool = True, **overrides):
    """FluxTransformer2DModel on the packed latent (64 channels per 2x2 patch); head width 16 = rope axes 4+6+6."""
    from diffusers import FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers,
                  num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=heads,
                  joint_attention_dim=FLUX_T5_WIDTH, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                  axes_dims_rope=(4, 6, 6))
    config.update(overrides)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config).eval()


def flux_pipeline(seed: int = 0, transformer=None, scheduler=None):
    """FluxPipeline with tiny random parts and FLUX.1-dev's dynamic-shift scheduler.
    Call it with max_sequence_length=MAX_TOKENS."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        transformer=transformer if transformer is not None else flux_transformer(seed),
        scheduler=scheduler if scheduler is not None else flow_scheduler(dynamic=True),
        vae=vae(seed + 1), text_encoder=clip_text_encoder(seed + 2), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(seed + 3, FLUX_T5_WIDTH), tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe
