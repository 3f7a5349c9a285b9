"""DiT (Peebles & Xie, 2023): a class-conditional latent diffusion transformer.

Re-implements the maths and the parameter layout of facebookresearch/DiT
`models.py`: every state-dict key and shape is the official one, so the released
`DiT-XL-2-256x256.pt` / `DiT-XL-2-512x512.pt` load with `strict=True`.

Notation in shape comments:
    N  batch, C in_channels, H/W latent height/width, p patch size,
    T  number of tokens = (H/p) * (W/p), D hidden size, C_out out_channels.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp, PatchEmbed

from diffusion.attention import mark_attention
from diffusion.errors import UserError
from diffusion.guidance import apply_cfg


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN affine: x (N, T, D), shift/scale (N, D) broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------
# Fixed sin-cos positional embedding (not learned, but stored in the state dict)
# ---------------------------------------------------------------------------

def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) float64 -> (M, dim): [sin(pos * omega), cos(pos * omega)]."""
    assert dim % 2 == 0, "sin-cos embedding needs an even dimension"
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega                      # (dim/2,)
    angles = pos.reshape(-1, 1) * omega[None]       # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) float64 table, tokens in row-major (row, col) order.

    Follows the official (MAE) construction: the grid is built with "xy" meshgrid
    ordering, so grid[0] holds the *column* index and grid[1] the row index; the
    first half of the channels encodes grid[0] and the second half grid[1].
    """
    assert dim % 2 == 0
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0)  # (2, G, G)
    first = sincos_1d(dim // 2, grid[0])            # (G*G, dim/2), column index
    second = sincos_1d(dim // 2, grid[1])           # (G*G, dim/2), row index
    return torch.cat([first, second], dim=1)


# ---------------------------------------------------------------------------
# Conditioning embedders
# ---------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): 256-d sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t (N,) possibly fractional -> (N, dim) float32, [cos | sin] halves.

        Frequencies are exp(-ln(max_period) * i / half), i < half (no "-1" in the
        denominator; diffusers' DiT uses half - 1, see dit/convert.py).
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]     # (N, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) float32
        # Features are made in float32 for accuracy, then cast so a .half()/.bfloat16() model runs.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (N,) -> (N, D). Row `num_classes` is the null ("unconditional") class.

    The null row exists only when class_dropout_prob > 0, which is what lets the
    same network serve as the unconditional branch of classifier-free guidance.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------

def _sdpa_self_attention(dim: int, num_heads: int) -> Attention:
    """timm self-attention (keys qkv.*, proj.*) pinned to F.scaled_dot_product_attention.

    timm picks SDPA from a global/env switch; the official models ran whatever timm
    chose, which is the same maths. We pin it so speed does not depend on env vars.
    """
    attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
    attn.fused_attn = True
    return mark_attention(attn, cross=False)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x (N, T, D), c (N, D) -> (N, T, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = _sdpa_self_attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"),
            drop=0,
        )
        # c -> 6 modulation vectors (N, D) each; zero-initialised so a fresh block is identity.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """x (N, T, D), c (N, D) -> (N, T, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion transformer over a (C, H, W) latent with class conditioning."""

    # compile=regional compiles each of these once (diffusers' compile_repeated_blocks convention)
    _repeated_blocks = ("DiTBlock",)

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        # learn_sigma: the extra C channels parameterise the variance interpolation.
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Frozen sin-cos table (1, T, D); a Parameter (not a buffer) to keep the official key.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init. Only matters for training; checkpoints overwrite all of it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        grid = int(self.x_embedder.num_patches**0.5)
        table = sincos_2d(self.pos_embed.shape[-1], grid).float()[None]  # (1, T, D)
        with torch.no_grad():
            self.pos_embed.copy_(table.to(self.pos_embed.device))

        # Patch conv initialised like a Linear over its flattened (C*p*p) input.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H, W); token t = row * (W/p) + col."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], "DiT expects a square token grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)       # (N, C_out, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latent, t (N,) timesteps on the training scale [0, 1000), y (N,) labels.

        Returns (N, C_out, H, W): eps in the first C channels, then (if learn_sigma)
        the variance-interpolation values.
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed     # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            x = block(x, c)                         # (N, T, D)
        x = self.final_layer(x, c)                  # (N, T, p*p*C_out)
        return self.unpatchify(x)                   # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = 3,
    ) -> torch.Tensor:
        """Batched classifier-free guidance, official semantics.

        x (2B, C, H, W): only its first half is used (duplicated), as officially;
        y (2B,): conditional labels then null labels (index num_classes).
        Returns (2B, C_out, H, W): the guided channels hold the guided eps in both
        halves; all other channels are each row's own unguided output. The default
        guided_channels=3 reproduces the official code (and its reported FID);
        None guides all C eps channels.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)  # (2B, C_out, H, W)
        cond, uncond = out.chunk(2, dim=0)
        guided = apply_cfg(cond, uncond, cfg_scale, self.in_channels, guided_channels)
        g = self.in_channels if guided_channels is None else guided_channels
        uncond_rows = torch.cat([guided[:, :g], uncond[:, g:]], dim=1)
        return torch.cat([guided, uncond_rows], dim=0)


# ---------------------------------------------------------------------------
# Registry: official names -> constructors
# ---------------------------------------------------------------------------

# size -> (depth, hidden_size, num_heads), from the DiT paper's Table 1.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def dit_config(name: str) -> dict:
    """Architecture of an official name, e.g. "DiT-XL/2" -> depth, hidden_size, patch_size, num_heads."""
    if name not in DiT_models:
        raise UserError(f"unknown DiT model {name!r}; allowed: {', '.join(DiT_models)}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = _SIZES[size]
    patch_size = int(patch)
    return {"depth": depth, "hidden_size": hidden, "patch_size": patch_size, "num_heads": heads}


def _build(name: str, **kwargs) -> DiT:
    """kwargs: input_size, num_classes, learn_sigma, class_dropout_prob, in_channels, mlp_ratio."""
    return DiT(**dit_config(name), **kwargs)


def DiT_XL_2(**kwargs): return _build("DiT-XL/2", **kwargs)
def DiT_XL_4(**kwargs): return _build("DiT-XL/4", **kwargs)
def DiT_XL_8(**kwargs): return _build("DiT-XL/8", **kwargs)
def DiT_L_2(**kwargs): return _build("DiT-L/2", **kwargs)
def DiT_L_4(**kwargs): return _build("DiT-L/4", **kwargs)
def DiT_L_8(**kwargs): return _build("DiT-L/8", **kwargs)
def DiT_B_2(**kwargs): return _build("DiT-B/2", **kwargs)
def DiT_B_4(**kwargs): return _build("DiT-B/4", **kwargs)
def DiT_B_8(**kwargs): return _build("DiT-B/8", **kwargs)
def DiT_S_2(**kwargs): return _build("DiT-S/2", **kwargs)
def DiT_S_4(**kwargs): return _build("DiT-S/4", **kwargs)
def DiT_S_8(**kwargs): return _build("DiT-S/8", **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
