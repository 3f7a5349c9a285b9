"""Tiny random-weight diffusers pipelines, built offline in well under a second each.

Every builder returns a pipeline whose components are small (widths 8..32, one or two
blocks), with hand-made tokenizers (a byte-level CLIP vocab with no merges; a T5
vocab from (piece, score) pairs) and text encoders in eval mode. `save_tiny(kind, dir)`
writes one with `save_pretrained`, so a second process (the reference `tgate` 1.0.0
package, which cannot share our process: both are called `tgate`) loads the very
same weights with `load_tiny(kind, dir)`.

Kinds: sd, sdxl, sdxl_lcm, pixart_alpha, pixart_sigma, svd, sd_controlnet.
"""
from __future__ import annotations

from pathlib import Path

import torch

TEXT_WIDTH = 32  # hidden size of every tiny text encoder
TOKENS = 16  # tokenizer max length: prompts are padded to this many tokens


def _byte_characters() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255: printable Latin-1 bytes
    stand for themselves, the others are moved to code points 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _clip_vocab() -> dict[str, int]:
    """Byte-level CLIP vocab: the two specials, the 256 byte characters alone and with </w>."""
    chars = _byte_characters()
    pieces = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return {piece: i for i, piece in enumerate(pieces)}


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=TOKENS)


def clip_text_encoder(seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(_clip_vocab()), hidden_size=TEXT_WIDTH, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENS,
                            projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()  # built from a config a model is in training mode (dropout)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0 - i / 100) for i, c in enumerate(range(ord("a"), ord("z") + 1))]
    pieces += [("\u2581" + chr(c), -1.5 - i / 100) for i, c in enumerate(range(ord("a"), ord("z") + 1))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TOKENS)


def t5_text_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def sd_unet(seed: int, cross_attention_dim: int = TEXT_WIDTH, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4, **extra)


def _scheduler(name: str):
    import diffusers

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if name == "LCMScheduler":
        return diffusers.LCMScheduler(**common)
    if name == "EulerDiscreteScheduler":
        return diffusers.EulerDiscreteScheduler(**common)
    return getattr(diffusers, name)(**common)


def sd(seed: int = 0, scheduler: str = "DDIMScheduler"):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(unet=sd_unet(seed), text_encoder=clip_text_encoder(seed + 1),
                                   tokenizer=clip_tokenizer(), vae=vae(seed + 2), scheduler=_scheduler(scheduler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl_unet(seed: int, **extra):
    # text_time conditioning: 6 time ids of 8 features each + the pooled text (TEXT_WIDTH)
    return sd_unet(seed, cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time",
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
                   transformer_layers_per_block=(1, 1), **extra)


def sdxl(seed: int = 0, scheduler: str = "EulerDiscreteScheduler", unet=None):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=unet if unet is not None else _sdxl_unet(seed), text_encoder=clip_text_encoder(seed + 1),
        text_encoder_2=clip_text_encoder(seed + 3, projection=True), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), vae=vae(seed + 2), scheduler=_scheduler(scheduler),
        force_zeros_for_empty_prompt=True)


def sdxl_lcm(seed: int = 0):
    """SD-XL with an LCM-distilled-style U-Net (guidance embedding, time_cond_proj_dim) and LCMScheduler."""
    return sdxl(seed, scheduler="LCMScheduler", unet=_sdxl_unet(seed, time_cond_proj_dim=8))


def _pixart(cls, seed: int, sample_size: int = 8):
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=TEXT_WIDTH, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, norm_num_groups=8)
    return cls(transformer=transformer, text_encoder=t5_text_encoder(seed + 1), tokenizer=t5_tokenizer(),
               vae=vae(seed + 2), scheduler=DPMSolverMultistepScheduler())


def pixart_alpha(seed: int = 0):
    from diffusers import PixArtAlphaPipeline

    return _pixart(PixArtAlphaPipeline, seed)


def pixart_sigma(seed: int = 0):
    from diffusers import PixArtSigmaPipeline

    return _pixart(PixArtSigmaPipeline, seed)


def svd(seed: int = 0):
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
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=TEXT_WIDTH,
        num_attention_heads=(2, 4), num_frames=2, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8)
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, intermediate_size=37, patch_size=8)).eval()
    torch.manual_seed(seed + 2)
    video_vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                                             down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
                                             layers_per_block=1)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="v_prediction",
                                       interpolation_type="linear", use_karras_sigmas=True,
                                       timestep_spacing="leading", steps_offset=1)
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return StableVideoDiffusionPipeline(vae=video_vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=processor)


def controlnet(seed: int = 0):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, in_channels=4,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=TEXT_WIDTH,
                           conditioning_embedding_out_channels=(8, 8), norm_num_groups=8, attention_head_dim=4)


def sd_controlnet(seed: int = 0):
    from diffusers import StableDiffusionControlNetPipeline

    base = sd(seed)
    return StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet(seed + 5))


BUILDERS = {"sd": sd, "sdxl": sdxl, "sdxl_lcm": sdxl_lcm, "pixart_alpha": pixart_alpha,
            "pixart_sigma": pixart_sigma, "svd": svd, "sd_controlnet": sd_controlnet}
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sdxl_lcm": "StableDiffusionXLPipeline", "pixart_alpha": "PixArtAlphaPipeline",
                    "pixart_sigma": "PixArtSigmaPipeline", "svd": "StableVideoDiffusionPipeline",
                    "sd_controlnet": "StableDiffusionControlNetPipeline"}


def save_tiny(kind: str, folder: Path) -> Path:
    """Build the tiny `kind` pipeline and save it (once) under folder/kind."""
    target = Path(folder) / kind
    if not (target / "model_index.json").exists():
        BUILDERS[kind]().save_pretrained(target)
    return target


def load_tiny(kind: str, folder: Path):
    """Load a pipeline written by save_tiny (offline, no hub); text encoders in eval mode."""
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASSES[kind]).from_pretrained(Path(folder) / kind)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def svd_image(seed: int = 0) -> torch.Tensor:
    """A fixed 32x32 conditioning image for SVD, values in [0, 1], shape (1, 3, 32, 32)."""
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
