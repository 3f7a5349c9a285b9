"""The LDM U-Net (Rombach et al. 2022), in the CompVis parameter layout.

Re-implements `ldm.modules.diffusionmodules.openaimodel.UNetModel`: it takes the
same constructor arguments (a CompVis yaml's `unet_config.params` as they are) and
every state-dict key is CompVis's, so `model.diffusion_model.*` of a CompVis `.ckpt`
loads with `strict=True`.

Layout (what DeepCache and the key converters rely on): `input_blocks[0]` is the input
conv; then per level `num_res_blocks` blocks [ResBlock, (attention)] and, except at the
last level, one down-sampling block. `middle_block` is [ResBlock, attention, ResBlock].
`output_blocks` mirror the input blocks: block j concatenates the skip from input block
`len(input_blocks) - 1 - j`.

Shapes: B batch, C channels, H/W latent height/width, E = 4 * model_channels (time embedding).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion.errors import UserError

from .transformer import AttentionBlock, SpatialTransformer, group_norm


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin] features (CompVis order: cosine first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepBlock(nn.Module):
    """A block that also takes the time embedding."""


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (`op`), or average pooling without one."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise UserError("Downsample without a conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W (nearest), then an optional 3x3 conv (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, add (or scale-shift by) the time embedding, GroupNorm-SiLU-dropout-conv,
    plus a skip (identity, or a 1x1 conv when the width changes). up/down: resample inside."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the norm-activation and the conv, as CompVis
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]   # (B, C' or 2C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, giving each what it takes: ResBlocks the time embedding,
    transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """CompVis `UNetModel`. Arguments are CompVis's; differences:

    - only `dims=2` (images) is built; 1-D / 3-D U-Nets are refused.
    - `use_checkpoint` (gradient checkpointing) and `use_fp16` are accepted and ignored:
      this is an inference implementation; the dtype follows `.to(dtype)`.
    - `num_classes` may be an int (a `label_emb` table added to the time embedding);
      CompVis's "continuous"/"sequential" label inputs are refused.
    - `use_linear_in_transformer` (SD 2.x) is accepted as well.
    """

    # compile=regional compiles each of these once (diffusers' compile_repeated_blocks convention);
    # the forward itself stays eager, so DeepCache's shallow steps need nothing special
    _repeated_blocks = ("ResBlock", "SpatialTransformer", "AttentionBlock")

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions,
        dropout: float = 0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
    ):
        super().__init__()
        if dims != 2:
            raise UserError(f"dims={dims}: only 2-D U-Nets (dims=2) are implemented")
        if use_spatial_transformer and context_dim is None:
            raise UserError("use_spatial_transformer=True needs context_dim (the cross-attention context width)")
        if context_dim is not None and not isinstance(context_dim, int):
            context_dim = list(context_dim)[0]  # CompVis allows a list (one per level, all equal in practice)
        if num_classes is not None and not isinstance(num_classes, int):
            raise UserError(f"num_classes={num_classes!r}: only an int (a label embedding table) is supported")
        if num_heads == -1 and num_head_channels == -1:
            raise UserError("set num_heads or num_head_channels")
        if not isinstance(transformer_depth, int):
            raise UserError(f"transformer_depth={transformer_depth!r}: one int for all levels is supported")
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample

        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_res_blocks = model_channels, num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes, self.context_dim = num_classes, context_dim
        self.predict_codebook_ids = n_embed is not None
        emb_dim = model_channels * 4

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def attention(ch: int, upsampling: bool = False):
            """The attention layer at width ch, with CompVis's head-count rules (incl. `legacy`)."""
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if use_spatial_transformer:
                if legacy:
                    dim_head = ch // heads
                return SpatialTransformer(ch, heads, dim_head, transformer_depth, dropout, context_dim,
                                          use_linear_in_transformer)
            # CompVis hands AttentionBlock `num_head_channels` (legacy) or dim_head as its head width
            return AttentionBlock(ch, num_heads_upsample if upsampling else num_heads,
                                  num_head_channels if legacy else dim_head, use_new_attention_order)

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attention(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, upsampling=True))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(group_norm(ch), nn.Conv2d(model_channels, n_embed, 1))

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        """(B,) timesteps (and labels) -> (B, E) embedding every ResBlock takes; a 0-d timestep
        is broadcast to `batch` rows."""
        if timesteps.ndim == 0 and batch is not None:
            timesteps = timesteps.expand(batch)
        if (y is not None) != (self.num_classes is not None):
            raise UserError("pass class labels y exactly when the U-Net has num_classes "
                             f"(num_classes={self.num_classes}, y given: {y is not None})")
        features = timestep_embedding(timesteps, self.model_channels)  # float32, then the weights' type
        emb = self.time_embed(features.to(self.time_embed[0].weight.dtype))
        return emb + self.label_emb(y) if y is not None else emb

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,) on the training scale, context (B, M, context_dim)
        -> (B, out_channels, H, W)."""
        self.check_input(x, context)
        emb = self.embed(timesteps, y, batch=x.shape[0])
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.head(h.type(x.dtype))

    def check_input(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"U-Net input must be (B, {self.in_channels}, H, W); got {tuple(x.shape)}")
        levels = 2 ** (len(self.channel_mult) - 1)
        if x.shape[-1] % levels or x.shape[-2] % levels:
            raise UserError(f"latent side {tuple(x.shape[-2:])} must be a multiple of {levels} "
                             f"(the U-Net halves it {len(self.channel_mult) - 1} times)")
        if (self.context_dim is not None and context is not None
                and (context.ndim != 3 or context.shape[-1] != self.context_dim)):
            raise UserError(f"context must be (B, tokens, {self.context_dim}) (context_dim={self.context_dim}); "
                             f"got {tuple(context.shape)}")

