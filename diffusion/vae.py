"""The first stage: a diffusers AutoencoderKL from a local folder or a hub id, or pixel space.

`FirstStage` is what a run needs of it: the latent channels, the downsampling factor,
and latents -> uint8 images.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from diffusion.errors import UserError


class VAENotFoundError(FileNotFoundError):
    pass


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_vae(source: str, *, pretrained: bool = True, arch: dict | None = None) -> AutoencoderKL:
    """AutoencoderKL in eval mode.

    source: a `save_pretrained` folder, or a hub id (`stabilityai/sd-vae-ft-ema`) read
    from the Hugging Face cache or downloaded. pretrained=False builds random weights
    from `arch` (the AutoencoderKL config) without touching disk or network.
    """
    if not pretrained:
        if not arch:
            raise UserError("pretrained=false needs vae.arch (an AutoencoderKL config) to build a random VAE")
        return AutoencoderKL(**dict(arch)).eval()
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        try:
            return AutoencoderKL.from_pretrained(path).eval()
        except (OSError, ValueError) as err:
            raise VAENotFoundError(f"VAE folder {str(path)!r} is not a diffusers AutoencoderKL folder "
                                   f"(config.json + weights): {err}") from err
    if path.suffix or path.is_absolute() or str(source).count("/") != 1:
        raise VAENotFoundError(f"VAE {source!r} is neither an existing folder "
                               "nor a hub id like 'stabilityai/sd-vae-ft-ema'")
    try:
        return AutoencoderKL.from_pretrained(str(source)).eval()
    except (OSError, ValueError) as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        why = "downloads are off (HF_HUB_OFFLINE=1)" if _offline() else f"the download failed ({err})"
        raise VAENotFoundError(
            f"cannot load the VAE {source!r}: it is not a local folder, not in the Hugging Face cache "
            f"({HF_HUB_CACHE}), and {why}. Fetch it once on a machine with network "
            f"(`huggingface-cli download {source}`) or point vae.source at a local save_pretrained folder."
        ) from err


def downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8, quantised as ADM/DiT's sample_ddp; grey is repeated to RGB."""
    images = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_to_uint8(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float | None = None) -> np.ndarray:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    param = next(vae.parameters())
    return to_uint8(vae.decode(latents.to(param.device, param.dtype) / scale).sample)


class FirstStage:
    """Latent <-> image: an AutoencoderKL, or (vae=None) pixel space with `channels` channels."""

    def __init__(self, vae: AutoencoderKL | None = None, channels: int | None = None):
        if (vae is None) == (channels is None):
            raise UserError("give a VAE or, for pixel space, the image channels")
        self.vae = vae
        self.latent_channels = vae.config.latent_channels if vae is not None else int(channels)
        self.factor = downsample_factor(vae) if vae is not None else 1

    def to(self, dtype: torch.dtype) -> FirstStage:
        """The network in `dtype` (precision bf16/fp16; decode casts the latents to it). Pixel space has none."""
        if self.vae is not None and self.vae.dtype != dtype:  # (diffusers warns on every .to(dtype))
            self.vae.to(dtype)
        return self

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) -> (B, H, W, 3) uint8."""
        return to_uint8(latents) if self.vae is None else decode_to_uint8(self.vae, latents)


def load_first_stage(vae_cfg, *, pretrained: bool, device) -> FirstStage:
    """From a `vae` config: `source: null` is pixel space with `channels` image channels."""
    if vae_cfg.get("source") is None:
        return FirstStage(channels=vae_cfg.get("channels", 3))
    return FirstStage(load_vae(vae_cfg.source, pretrained=pretrained, arch=vae_cfg.get("arch")).to(device))
