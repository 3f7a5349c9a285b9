"""Convert DiT weights between the official layout and diffusers' DiTTransformer2DModel.

Key correspondence (official <-> diffusers), per block i:
    blocks.i.adaLN_modulation.1      <-> transformer_blocks.i.norm1.linear
    blocks.i.attn.qkv  (3D, D) rows  <-> transformer_blocks.i.attn1.to_q / to_k / to_v  (q, k, v order)
    blocks.i.attn.proj               <-> transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2           <-> transformer_blocks.i.ff.net.0.proj / ff.net.2
and once per model:
    x_embedder.proj                  <-> pos_embed.proj
    t_embedder.mlp.0 / mlp.2         <-> transformer_blocks.i.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table       <-> transformer_blocks.i.norm1.emb.class_embedder.embedding_table
    final_layer.adaLN_modulation.1   <-> proj_out_1
    final_layer.linear               <-> proj_out_2
    pos_embed (1, T, D)              <-> (not stored by diffusers; recomputed here)

diffusers stores one timestep/label embedder copy per block (all equal in
practice); we write a copy into every block and read block 0's back.

Known numerical differences of diffusers' DiT that no weight mapping can fix:
  * its Timesteps uses downscale_freq_shift=1, i.e. frequencies
    exp(-ln(1e4) * i / (half - 1)) instead of the official / half;
  * the pre-MLP LayerNorm (`norm3`) uses config.norm_eps (default 1e-5; official 1e-6).
We write norm_eps=1e-6 into configs we produce so only the first one remains.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion.errors import MissingFileError, UserError
from dit.models import _SIZES, sincos_2d

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Embedder parameters that diffusers duplicates into every block: official key -> suffix under norm1.emb.
_EMBEDDER_KEYS = {
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}

# Per-block parameters (excluding qkv, which is split): official suffix -> diffusers suffix.
_BLOCK_KEYS = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}

# Top-level parameters: official prefix -> diffusers prefix.
_TOP_KEYS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


def _depth(state_dict: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise UserError(f"non-contiguous block indices under {prefix!r}: {sorted(ids)}")
    return len(ids)


def _heads_for_hidden(hidden: int) -> int:
    matches = {heads for _, h, heads in _SIZES.values() if h == hidden}
    if len(matches) != 1:
        raise UserError(f"cannot infer num_heads for hidden size {hidden}; pass num_heads=")
    return matches.pop()


def official_to_diffusers(
    state_dict: dict[str, torch.Tensor],
    num_heads: int | None = None,
    num_classes: int | None = None,
    norm_eps: float = 1e-6,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Official DiT state dict -> (diffusers state dict, DiTTransformer2DModel config).

    Sizes are read off the tensors. num_heads is not visible in the weights and is
    inferred from the hidden size of the four official sizes unless given. The label
    table is assumed to end with the null-class row (class_dropout_prob > 0, true of
    every released checkpoint); pass num_classes to have that checked.
    norm_eps goes into the config: 1e-6 makes diffusers' pre-MLP norm match official.
    """
    sd = state_dict
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape  # (D, C, p, p)
    num_tokens = sd["pos_embed"].shape[1]
    grid = int(round(num_tokens**0.5))
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    table_rows = sd["y_embedder.embedding_table.weight"].shape[0]
    depth = _depth(sd, "blocks.")
    heads = num_heads or _heads_for_hidden(hidden)
    # diffusers' LabelEmbedding always has a null row (class_dropout_prob=0.1 hard-coded).
    standard = sincos_2d(hidden, grid).float()[None]  # (1, T, D)
    if sd["pos_embed"].shape != standard.shape or not torch.allclose(sd["pos_embed"].float(), standard, atol=1e-5):
        raise UserError("pos_embed is not the standard sin-cos table; diffusers recomputes it, so it would be lost")
    if num_classes is None:
        num_classes = table_rows - 1
    if table_rows != num_classes + 1 or num_classes < 1:
        raise UserError(
            f"label table has {table_rows} rows; diffusers needs num_classes + 1 = {num_classes + 1} "
            "(a null-class row, i.e. a model trained with class_dropout_prob > 0)"
        )

    out: dict[str, torch.Tensor] = {}
    for src, dst in _TOP_KEYS.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = sd[f"{src}.{kind}"]
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for src, dst in _BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"{d}{dst}.{kind}"] = sd[f"{b}{src}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)  # each (D, D) / (D,)
            out[f"{d}attn1.to_q.{kind}"] = q
            out[f"{d}attn1.to_k.{kind}"] = k
            out[f"{d}attn1.to_v.{kind}"] = v
        for src, dst in _EMBEDDER_KEYS.items():
            for kind in ("weight", "bias"):
                if f"{src}.{kind}" in sd:
                    out[f"{d}norm1.emb.{dst}.{kind}"] = sd[f"{src}.{kind}"]
    # Contiguous copies: chunk() views and shared tensors do not serialise cleanly.
    out = {k: v.clone().contiguous() for k, v in out.items()}

    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": grid * patch,
        "patch_size": patch,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": norm_eps,
    }
    return out, config


def official_kwargs_from_diffusers_config(config: dict) -> dict:
    """DiTTransformer2DModel config -> keyword arguments of dit.models.DiT."""
    unsupported = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, want in unsupported.items():
        if config.get(key, want) != want:
            raise UserError(f"diffusers DiT config has {key}={config[key]!r}; only {want!r} maps to the official DiT")
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"out_channels={out_channels} must be in_channels ({in_channels}) or twice it")
    heads = config.get("num_attention_heads", 16)
    return {
        "input_size": config.get("sample_size", 32),
        "patch_size": config.get("patch_size", 2),
        "in_channels": in_channels,
        "hidden_size": heads * config.get("attention_head_dim", 72),
        "depth": config.get("num_layers", 28),
        "num_heads": heads,
        "num_classes": config.get("num_embeds_ada_norm", 1000),
        "learn_sigma": out_channels == 2 * in_channels,
        "class_dropout_prob": 0.1,  # diffusers always keeps the null-class row
    }


def diffusers_to_official(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel state dict + config -> official DiT state dict.

    Raises ValueError if the per-block embedder copies are not all identical
    (the official model has a single shared embedder, so nothing could be kept).
    """
    sd = state_dict
    kwargs = official_kwargs_from_diffusers_config(config)
    depth = _depth(sd, "transformer_blocks.")
    if depth != kwargs["depth"]:
        raise UserError(f"config says num_layers={kwargs['depth']} but the weights have {depth} blocks")

    out: dict[str, torch.Tensor] = {}
    for dst, src in _TOP_KEYS.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = sd[f"{src}.{kind}"]
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for dst, src in _BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"{b}{dst}.{kind}"] = sd[f"{d}{src}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{b}attn.qkv.{kind}"] = torch.cat(
                [sd[f"{d}attn1.to_{n}.{kind}"] for n in ("q", "k", "v")], dim=0
            )  # (3D, D) / (3D,)

    for dst, src in _EMBEDDER_KEYS.items():
        for kind in ("weight", "bias"):
            key0 = f"transformer_blocks.0.norm1.emb.{src}.{kind}"
            if key0 not in sd:
                continue
            differing = [
                i for i in range(1, depth)
                if not torch.equal(sd[f"transformer_blocks.{i}.norm1.emb.{src}.{kind}"], sd[key0])
            ]
            if differing:
                raise UserError(
                    f"diffusers per-block embedder copies of {src}.{kind} differ from block 0 in blocks "
                    f"{differing}; the official DiT has one shared embedder, so this model cannot be converted"
                )
            out[f"{dst}.{kind}"] = sd[key0]

    hidden = kwargs["hidden_size"]
    grid = kwargs["input_size"] // kwargs["patch_size"]
    out["pos_embed"] = sincos_2d(hidden, grid).float()[None]  # (1, T, D)
    return {k: v.clone().contiguous() for k, v in out.items()}


def _diffusers_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    if (folder / "config.json").is_file() and _has_weights(folder):
        return folder
    if (folder / "transformer" / "config.json").is_file():  # a DiTPipeline folder
        return folder / "transformer"
    raise MissingFileError(
        f"{folder} is not a diffusers DiT folder: expected config.json + {DIFFUSERS_WEIGHTS} "
        f"(or a pipeline folder with a transformer/ subfolder)"
    )


def _has_weights(folder: Path) -> bool:
    return (folder / DIFFUSERS_WEIGHTS).is_file() or (folder / f"{DIFFUSERS_WEIGHTS}.index.json").is_file()


def is_diffusers_folder(path: str | Path) -> bool:
    try:
        _diffusers_dir(path)
    except FileNotFoundError:
        return False
    return True


def read_diffusers_config(folder: str | Path) -> dict:
    """config.json of a diffusers DiT folder (or of a pipeline's transformer/)."""
    return json.loads((_diffusers_dir(folder) / "config.json").read_text())


def load_diffusers_dit(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a `save_pretrained` folder (or pipeline folder) -> (diffusers state dict, config). Offline."""
    from diffusion.checkpoint_files import read_safetensors

    config = read_diffusers_config(folder)
    folder = _diffusers_dir(folder)
    single = folder / DIFFUSERS_WEIGHTS
    if single.is_file():
        return read_safetensors(single), config
    # Sharded save: the index maps each key to its shard file.
    index = json.loads((folder / f"{DIFFUSERS_WEIGHTS}.index.json").read_text())
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state_dict.update(read_safetensors(folder / shard))
    return state_dict, config
