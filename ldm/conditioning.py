"""Class-conditional LDMs: CompVis's class embedder and the denoiser the sampler calls.

CompVis's ImageNet LDMs (cin256, cin256-v2, the T-Stitch pair) condition on the class
through cross-attention: `ClassEmbedder` maps labels (B,) to a one-token context
(B, 1, embed_dim). Its table has `n_classes` rows and CompVis's unconditional class is
the last row (`get_unconditional_conditioning`: n_classes - 1; cin256-v2 has 1001 rows,
so classes 0..999 and the null class 1000).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from diffusion.errors import UserError

from .unet import UNetModel


class ClassEmbedder(nn.Module):
    """CompVis `ldm.modules.encoders.modules.ClassEmbedder` (state-dict key `embedding.weight`).

    `key` and `ucg_rate` are CompVis training settings, accepted and unused here.
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0):
        super().__init__()
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def null_class(self) -> int:
        return self.n_classes - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) int labels -> (B, 1, embed_dim) cross-attention context."""
        if labels.ndim != 1:
            raise UserError(f"class labels must be a 1-D tensor (B,); got shape {tuple(labels.shape)}")
        return self.embedding(labels[:, None])


class ClassConditionalLDM(nn.Module):
    """The denoiser `model(x, t, y) -> eps` of a class-conditional LDM: U-Net + class embedder.

    Labels 0..num_classes-1 are classes; `num_classes` itself is the null (unconditional)
    class, the convention of the sampler core (and of DiT), mapped to the embedder's last row.
    """

    def __init__(self, unet: UNetModel, embedder: ClassEmbedder, name: str = "LDM"):
        super().__init__()
        if embedder.embedding.embedding_dim != unet.context_dim:
            raise UserError(f"class embedder width {embedder.embedding.embedding_dim} != the U-Net's context_dim "
                             f"{unet.context_dim}")
        self.unet, self.cond_stage_model = unet, embedder
        self.name = name

    # what T-Stitch's compatibility check and the run read (as on DiT)
    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def input_size(self) -> int:
        return self.unet.image_size

    @property
    def num_classes(self) -> int:
        return self.cond_stage_model.null_class

    learn_sigma = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) training-scale timesteps, y (B,) labels (num_classes = null) -> eps (B, C, H, W)."""
        if y.shape[0] != x.shape[0]:
            raise UserError(f"{y.shape[0]} labels for a batch of {x.shape[0]}")
        return self.unet(x, t, context=self.cond_stage_model(y))
