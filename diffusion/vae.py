"""The first stage: a diffusers AutoencoderKL from a local folder or a hub id."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL


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
            raise ValueError("pretrained=false needs vae.arch (an AutoencoderKL config) to build a random VAE")
        return AutoencoderKL(**dict(arch)).eval()
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        try:
            return AutoencoderKL.from_pretrained(path).eval()
        except (OSError, ValueError) as err:
            raise VAENotFoundError(f"VAE folder {str(path)!r} is not a diffusers AutoencoderKL folder "
                                   f"(config.json + weights): {err}") from err
    if path.suffix or path.is_absolute() or str(source).count("/") != 1:
        raise VAENotFoundError(f"VAE {source!r} is neither an existing folder nor a hub id like 'stabilityai/sd-vae-ft-ema'")
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


@torch.no_grad()
def decode_to_uint8(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float | None = None) -> np.ndarray:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images, quantised as ADM/DiT's sample_ddp."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype) / scale).sample.float()
    images = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
