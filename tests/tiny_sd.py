"""Tiny random Stable Diffusion pipelines, built offline in milliseconds (no hub, no network).

Widths follow diffusers' own pipeline tests: a 2-level UNet, a 2-level VAE (downsampling 2,
so a 16x16 image has an 8x8 latent), a 2-layer CLIP text encoder of width 32, and a byte-level
CLIP tokenizer from a hand-made vocab. Every builder takes a seed, so two calls with the same
seed give the same weights. Text encoders are put in eval mode (dropout would make two
identical calls differ).
"""
from __future__ import annotations

import torch

IMAGE_SIZE = 16      # pixels; the latent is 8x8
TEXT_WIDTH = 32      # CLIP hidden size
PROMPT = "a squirrel in the park"


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes: printable Latin-1 bytes
    stand for themselves, the others are mapped to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer():
    """A CLIP tokenizer with a byte-level vocab (start/end tokens, 256 bytes, and each with </w>)."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    pieces = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=32)


def clip_text_encoder(seed: int = 0, projection: bool = False, hidden_size: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, projection_dim=hidden_size,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=IMAGE_SIZE).eval()


def sd_unet(seed: int = 0, widths=(16, 32), cross_attention_dim: int = TEXT_WIDTH, **overrides):
    """An SD-1.x-style UNet on an 8x8x4 latent; `widths` = block_out_channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(block_out_channels=tuple(widths), layers_per_block=1, sample_size=8, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
                  norm_num_groups=4, attention_head_dim=4)
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_unet(seed: int = 0, widths=(16, 32), **overrides):
    """An SD-XL-style UNet: text_time added conditioning (pooled text 32 + 6 time ids x 8 = 80)."""
    config = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8, cross_attention_dim=2 * TEXT_WIDTH,
                  transformer_layers_per_block=(1, 2), use_linear_projection=True)
    config.update(overrides)
    return sd_unet(seed, widths, **config)


def scheduler(name: str = "ddim"):
    """A scheduler with SD's training betas; name: ddim | pndm | euler | heun | lcm | dpmpp."""
    import diffusers

    classes = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
               "heun": "HeunDiscreteScheduler", "lcm": "LCMScheduler", "dpmpp": "DPMSolverMultistepScheduler"}
    extra = {"clip_sample": False, "set_alpha_to_one": False} if name == "ddim" else {}
    extra["steps_offset"] = 1
    if name == "pndm":
        extra["skip_prk_steps"] = True
    return getattr(diffusers, classes[name])(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000, **extra)


def sd_components(seed: int = 0, scheduler_name: str = "ddim", unet=None) -> dict:
    return dict(unet=unet if unet is not None else sd_unet(seed), vae=vae(seed), text_encoder=clip_text_encoder(seed),
                tokenizer=clip_tokenizer(), scheduler=scheduler(scheduler_name), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def sd_pipeline(seed: int = 0, scheduler_name: str = "ddim", unet=None, cls=None):
    """StableDiffusionPipeline (or `cls`, e.g. StableDiffusionImg2ImgPipeline) with tiny random parts."""
    from diffusers import StableDiffusionPipeline

    pipe = (cls or StableDiffusionPipeline)(**sd_components(seed, scheduler_name, unet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet(seed: int = 0):
    """A ControlNet built from the architecture and weights of `sd_unet(seed)`."""
    from diffusers import ControlNetModel

    unet = sd_unet(seed)
    torch.manual_seed(seed + 1)
    # conditioning image 16x16 -> 8x8 latent grid: two conditioning-embedding levels (one downsampling)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: make the residuals non-zero
        for name, p in model.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                p.normal_(0, 0.05)
    return model


def sd_controlnet_pipeline(seed: int = 0, unet=None):
    """StableDiffusionControlNetPipeline; its ControlNet is `controlnet(seed)` whatever `unet` is."""
    from diffusers import StableDiffusionControlNetPipeline

    parts = sd_components(seed, "ddim", unet)
    cn = controlnet(seed)
    pipe = StableDiffusionControlNetPipeline(controlnet=cn, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed: int = 0, scheduler_name: str = "euler", unet=None):
    """StableDiffusionXLPipeline: two CLIP text encoders (the second with a projection)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        unet=unet if unet is not None else sdxl_unet(seed), vae=vae(seed), scheduler=scheduler(scheduler_name),
        text_encoder=clip_text_encoder(seed), text_encoder_2=clip_text_encoder(seed + 1, projection=True),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(seed: int = 0):
    """A (1, 3, 16, 16) conditioning image in [0, 1]."""
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def t5_tokenizer():
    """A T5 tokenizer from a hand-made unigram vocab: pad, eos, unk, the letters and the word marker."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab + [("\u2581", -2.0)], extra_ids=0)


def t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=30, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, pad_token_id=0,
                      eos_token_id=1)
    return T5EncoderModel(config).eval()


def pixart_transformer(seed: int = 0, num_layers: int = 2, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = dict(sample_size=8, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                  caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8)
    config.update(overrides)
    return PixArtTransformer2DModel(**config).eval()


def pixart_pipeline(seed: int = 0, transformer=None):
    """PixArtAlphaPipeline (T5 text encoder); call it with use_resolution_binning=False, clean_caption=False."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(seed), vae=vae(seed),
                               transformer=transformer if transformer is not None else pixart_transformer(seed),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_pipeline(seed: int = 0):
    """StableVideoDiffusionPipeline (image-conditioned video) with tiny parts; its UNet needs widths that are
    multiples of 32 (fixed GroupNorm groups) and its CLIP image encoder sees 224x224 (the pipeline resizes)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=16,
        num_attention_heads=2, projection_class_embeddings_input_dim=3 * 8, addition_time_embed_dim=8).eval()
    video_vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                             down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=1, num_attention_heads=2, image_size=224,
        intermediate_size=16, patch_size=32)).eval()
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(vae=video_vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    pipe.set_progress_bar_config(disable=True)
    return pipe
