"""The LDM U-Net's attention layers, in CompVis's parameter layout.

`SpatialTransformer` (latent-diffusion `ldm/modules/attention.py`) is what the class-
and text-conditional LDMs use; `AttentionBlock` (`openaimodel.py`) is the plain
self-attention of unconditional / `use_spatial_transformer=False` models.

Shapes: B batch, C channels, H/W feature height/width, L = H*W tokens,
M context tokens, D context width, h heads, d head width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion.attention import mark_attention
from diffusion.errors import UserError


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """CompVis `normalization()` / `Normalize()`: 32 groups (their GroupNorm32 upcasts to
    float32 for half inputs; `GroupNorm32` below keeps that)."""
    if channels % 32:
        raise UserError(f"LDM U-Net layers use GroupNorm with 32 groups: {channels} channels is not a multiple of 32")
    return GroupNorm32(32, channels, eps=eps)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x (B, L, C) over `context` (B, M, D), or over x itself.

    Returns the attention branch only (after `to_out`), without the residual: the unit
    T-GATE caches. Marked `is_cross_attention` when built with a context width.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.context_dim = heads, context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        mark_attention(self, cross=context_dim is not None)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if self.context_dim is not None and context.shape[-1] != self.context_dim:
            raise UserError(f"cross-attention context has width {context.shape[-1]}; this model takes "
                             f"context_dim={self.context_dim} (context shape (B, tokens, {self.context_dim}))")
        B, L, _ = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, h*d) -> (B, h, N, d)
            return t.reshape(B, t.shape[1], h, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)       # scale d**-0.5, as CompVis
        return self.to_out(out.transpose(1, 2).reshape(B, L, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """CompVis FeedForward with glu=True (the only form the LDM transformer blocks use): keys net.0.proj, net.2."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention, GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): GroupNorm, 1x1 projection in, `depth` transformer blocks
    over the H*W tokens, projection out, plus the input."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_linear: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        # SD 2.x (use_linear_in_transformer) projects tokens with Linear; LDM / SD 1.x with 1x1 convs
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, dropout, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)                     # (B, L, inner)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, -1, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with a 1x1 `qkv` conv and the residual inside.

    Not marked for T-GATE: its output already includes the residual, and T-GATE caches
    the attention branch alone (the gated unit in the papers is the transformer's).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise UserError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.new_order = use_new_attention_order
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        flat = x.reshape(B, C, -1)                            # (B, C, L)
        qkv = self.qkv(self.norm(flat))                       # (B, 3C, L)
        h, L = self.num_heads, flat.shape[-1]
        if self.new_order:   # QKVAttention: [q | k | v], each split into heads
            q, k, v = (t.reshape(B, h, -1, L) for t in qkv.chunk(3, dim=1))
        else:                # QKVAttentionLegacy: heads first, each head's [q | k | v]
            q, k, v = qkv.reshape(B, h, -1, L).chunk(3, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))  # (B, h, L, d)
        out = out.transpose(2, 3).reshape(B, C, L)
        return (flat + self.proj_out(out)).reshape(x.shape)
