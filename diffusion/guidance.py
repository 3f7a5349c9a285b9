"""Classifier-free guidance: combine the conditional and unconditional outputs."""
from __future__ import annotations

import torch

from diffusion.errors import UserError


def apply_cfg(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    eps_channels: int,
    guided_channels: int | None = None,
) -> torch.Tensor:
    """Guided output `uncond + scale * (cond - uncond)` on the guided channels.

    cond, uncond: (B, C_out, H, W) denoiser outputs. The first `eps_channels` of
    C_out are the noise prediction; any channels after them (DiT's learned variance)
    are taken from the conditional branch unguided, as the official DiT does.

    guided_channels: how many of the eps channels are guided; None guides all of
    them. The official DiT `forward_with_cfg` guides only the first 3 of its 4 latent
    channels (its FID 2.27 comes from that quirk), so DiT configs set 3.
    """
    guided = eps_channels if guided_channels is None else guided_channels
    if not 0 < guided <= eps_channels:
        raise UserError(f"guided_channels={guided_channels} must be in [1, {eps_channels}] or None")
    out = cond.clone()
    out[:, :guided] = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    return out
