"""CompVis first stages (VQ-f4/f8 VQModelInterface, KL-f4/f8/... AutoencoderKL) as diffusers models.

A CompVis LDM yaml names its first stage under `model.params.first_stage_config` (target + params with
`ddconfig`); its weights are the checkpoint's `first_stage_model.*` entries. This module maps the config
to a diffusers `VQModel` / `AutoencoderKL` with the same modules and math (GroupNorm(32, eps 1e-6),
SiLU, asymmetric-pad stride-2 conv downsampling, nearest x2 + conv upsampling, single-head attention
with scale C^-1/2, 1x1 quant convs), loads the weights through `first_stage_convert`, and wraps the
result as the run's `diffusion.vae.FirstStage`.

Decoding, as the LDM sampler must do it: CompVis `LatentDiffusion.decode_first_stage(z)` computes
`z / scale_factor` and, for a VQ first stage, `VQModelInterface.decode(z, force_not_quantize=False)`:
the latent is snapped to the nearest codebook entry, then post_quant_conv, then the decoder.
diffusers `VQModel.decode(z)` defaults to `force_not_quantize=False` and does the same: its
VectorQuantizer takes the argmin of torch.cdist(z, codebook), taming's VectorQuantizer2 the argmin
of |z|^2 + |e|^2 - 2 z.e (the same entry up to floating-point near-ties), both then return
z + (e - z).detach(). `FirstStage.decode` (diffusion/vae.py) calls `vae.decode(z /
vae.config.scaling_factor)` with that default, so it decodes as CompVis does once `scaling_factor`
is the LDM's `scale_factor` (1.0, LatentDiffusion's default, for the CompVis cin256 / VQ yamls;
0.18215 for SD): the loaders here set it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, VQModel

from diffusion.errors import CheckpointKeyError, UserError
from diffusion.vae import FirstStage
from ldm.compvis import to_plain
from ldm.first_stage_convert import compvis_to_diffusers_first_stage, diffusers_key_to_compvis, select_first_stage

VQ_TARGETS = ("ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.VQModel")
KL_TARGETS = ("ldm.models.autoencoder.AutoencoderKL",)
IDENTITY_TARGET = "ldm.models.autoencoder.IdentityFirstStage"
NORM_GROUPS = 32  # CompVis Normalize(): GroupNorm(num_groups=32, eps=1e-6)
LDM_DEFAULT_SCALE_FACTOR = 1.0  # LatentDiffusion(scale_factor=1.0) when the yaml gives none

_DDCONFIG_REQUIRED = ("z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                      "num_res_blocks", "attn_resolutions")
# CompVis make_attn types with the AttnBlock weights and math ('vanilla-xformers' is the SD 2.x
# memory-efficient AttnBlock: same parameters, same result); 'none' is nn.Identity everywhere.
_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


def first_stage_kind(first_stage_config: Mapping) -> str:
    """'vq' or 'kl' from a CompVis `first_stage_config` (its `target`)."""
    config = to_plain(first_stage_config)
    if not isinstance(config, Mapping) or "target" not in config:
        raise UserError("first_stage_config must be a mapping with 'target' and 'params' "
                         f"(model.params.first_stage_config of a CompVis LDM yaml), got {config!r}")
    target = config["target"]
    if target in VQ_TARGETS:
        return "vq"
    if target in KL_TARGETS:
        return "kl"
    hint = " (pixel space: use diffusion.vae.FirstStage(channels=...))" if target == IDENTITY_TARGET else ""
    raise UserError(f"unsupported first_stage_config target {target!r}{hint}: allowed are "
                     f"{', '.join(VQ_TARGETS + KL_TARGETS)}")


def _attention_levels(ddconfig: Mapping) -> tuple[list[bool], list[bool]]:
    """Which levels (CompVis index, 0 = full resolution) carry AttnBlocks, in the encoder and the decoder.

    CompVis checks `curr_res in attn_resolutions` with curr_res = resolution halved (floor) after each
    encoder level, and resolution // 2**(n-1) doubled after each decoder level: the two only differ
    for resolutions that are not divisible by 2**(n-1), so they are computed separately.
    """
    n = len(ddconfig["ch_mult"])
    attn_res = {int(r) for r in ddconfig["attn_resolutions"]}
    encoder, curr = [], int(ddconfig["resolution"])
    for i in range(n):
        encoder.append(curr in attn_res)
        if i != n - 1:
            curr //= 2
    decoder, curr = [False] * n, int(ddconfig["resolution"]) // 2 ** (n - 1)
    for i in reversed(range(n)):
        decoder[i] = curr in attn_res
        if i != 0:
            curr *= 2
    return encoder, decoder


def _check_ddconfig(ddconfig: Mapping, kind: str) -> None:
    missing = [name for name in _DDCONFIG_REQUIRED if name not in ddconfig]
    if missing:
        raise UserError(f"first_stage_config.params.ddconfig lacks {', '.join(missing)}")
    ch, ch_mult = ddconfig["ch"], list(ddconfig["ch_mult"])
    if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
        raise UserError(f"ddconfig.ch_mult={ch_mult!r}: expected a non-empty list of positive integers")
    bad_width = [ch * m for m in ch_mult if (ch * m) % NORM_GROUPS]
    if bad_width:
        raise UserError(f"ddconfig.ch={ch} with ch_mult={ch_mult} gives widths {bad_width} that GroupNorm("
                         f"{NORM_GROUPS}) cannot split: every ch * ch_mult[i] must be a multiple of {NORM_GROUPS}")
    if not isinstance(ddconfig["num_res_blocks"], int) or ddconfig["num_res_blocks"] < 1:
        raise UserError(f"ddconfig.num_res_blocks={ddconfig['num_res_blocks']!r}: expected an integer >= 1")
    double_z = ddconfig.get("double_z", True)  # the CompVis Encoder default
    if kind == "vq" and double_z:
        raise UserError(f"ddconfig.double_z={double_z!r} for a VQ first stage: VQModel needs double_z: false "
                         "(its quant_conv takes z_channels inputs)")
    if kind == "kl" and not double_z:
        raise UserError(f"ddconfig.double_z={double_z!r} for AutoencoderKL: it needs double_z: true "
                         "(mean and log-variance)")
    attn_type = "linear" if ddconfig.get("use_linear_attn", False) else ddconfig.get("attn_type", "vanilla")
    if attn_type not in _ATTN_TYPES:
        raise UserError(f"ddconfig attn_type={attn_type!r} (or use_linear_attn: true) is not supported: diffusers' "
                         f"VAE attention is the vanilla AttnBlock; allowed are {', '.join(_ATTN_TYPES)}")
    if not ddconfig.get("resamp_with_conv", True):
        raise UserError("ddconfig.resamp_with_conv=False (average-pool down / conv-less upsampling) is not "
                         "supported: diffusers' VAE blocks always resample with a conv; allowed is true")
    for flag in ("give_pre_end", "tanh_out"):
        if ddconfig.get(flag, False):
            raise UserError(f"ddconfig.{flag}={ddconfig[flag]!r} is not supported: diffusers' Decoder always "
                             f"ends with norm_out + SiLU + conv_out and no tanh; allowed is false")


def first_stage_kwargs(first_stage_config: Mapping, *, scale_factor: float | None = None) -> tuple[type, dict]:
    """(diffusers class, constructor kwargs) for a CompVis `first_stage_config` (target + params).

    params: embed_dim, n_embed (VQ), ddconfig {double_z, z_channels, resolution, in_channels, out_ch, ch,
    ch_mult, num_res_blocks, attn_resolutions, dropout, [resamp_with_conv, attn_type, use_linear_attn,
    give_pre_end, tanh_out]}; lossconfig, ckpt_path, monitor and other training-only entries are
    ignored, and so is dropout (no effect in eval mode). scale_factor, when given, becomes the model's
    config.scaling_factor (diffusers' own default 0.18215 is wrong for the CompVis VQ models: pass it).
    Raises ValueError naming any value diffusers' VQModel/AutoencoderKL cannot represent.
    """
    kind = first_stage_kind(first_stage_config)
    config = to_plain(first_stage_config)
    params = config.get("params") or {}
    ddconfig = params.get("ddconfig")
    if not isinstance(ddconfig, Mapping):
        raise UserError(f"first_stage_config.params.ddconfig must be a mapping, got {ddconfig!r}")
    _check_ddconfig(ddconfig, kind)
    if "embed_dim" not in params:
        raise UserError("first_stage_config.params lacks embed_dim")
    embed_dim, z_channels = int(params["embed_dim"]), int(ddconfig["z_channels"])
    for name in ("remap", "colorize_nlabels"):
        if params.get(name) is not None:
            raise UserError(f"first_stage_config.params.{name}={params[name]!r} is not supported "
                             "(diffusers' VQModel has no index remapping / colorize buffer); allowed is null")
    if params.get("use_ema", False):
        raise UserError("first_stage_config.params.use_ema=True is not supported: the first stage's own EMA "
                         "(model_ema.*) is not loaded; allowed is false")

    encoder_attn, decoder_attn = _attention_levels(ddconfig)
    if ddconfig.get("attn_type", "vanilla") == "none":
        encoder_attn, decoder_attn = [False] * len(encoder_attn), [False] * len(decoder_attn)
    kwargs: dict[str, Any] = dict(
        in_channels=int(ddconfig["in_channels"]),
        out_channels=int(ddconfig["out_ch"]),
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in encoder_attn),
        # diffusers runs decoder levels bottom-up: its up block k is CompVis level n-1-k
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(decoder_attn)),
        block_out_channels=tuple(int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]),
        layers_per_block=int(ddconfig["num_res_blocks"]),
        act_fn="silu",
        latent_channels=z_channels,
        norm_num_groups=NORM_GROUPS,
        sample_size=int(ddconfig["resolution"]),
        mid_block_add_attention=ddconfig.get("attn_type", "vanilla") != "none",
    )
    if kind == "vq":
        if "n_embed" not in params:
            raise UserError("first_stage_config.params lacks n_embed (the VQ codebook size)")
        kwargs.update(num_vq_embeddings=int(params["n_embed"]), vq_embed_dim=embed_dim)
        cls = VQModel
    else:
        if embed_dim != z_channels:
            raise UserError(f"AutoencoderKL with embed_dim={embed_dim} != ddconfig.z_channels={z_channels} is not "
                             "supported: diffusers' AutoencoderKL ties its quant convs to latent_channels; "
                             "allowed is embed_dim == z_channels")
        cls = AutoencoderKL
    if scale_factor is not None:
        kwargs["scaling_factor"] = float(scale_factor)
    return cls, kwargs


def ldm_scale_factor(ldm_params: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None) -> float:
    """The latent scale of a CompVis LatentDiffusion: `model.params` of its yaml (+ its checkpoint).

    LatentDiffusion keeps `scale_factor` (default 1.0) as a plain float, or, with `scale_by_std: true`,
    as a buffer that training overwrote with 1/std of the first latents: then the checkpoint's
    top-level `scale_factor` entry is the value to use.
    """
    params = to_plain(ldm_params) or {}
    if params.get("scale_by_std", False):
        if state_dict is None or "scale_factor" not in state_dict:
            raise CheckpointKeyError("scale_by_std: true needs the checkpoint's 'scale_factor' entry "
                                     "(1/std of the latents)")
        return float(torch.as_tensor(state_dict["scale_factor"]).item())
    return float(params.get("scale_factor", LDM_DEFAULT_SCALE_FACTOR))


def load_first_stage_from_compvis(state_dict: Mapping[str, torch.Tensor], first_stage_config: Mapping, *,
                                  scale_factor: float) -> VQModel | AutoencoderKL:
    """A diffusers VQModel / AutoencoderKL in eval mode with a CompVis first stage's weights.

    state_dict: `first_stage_model.*` entries of the LDM checkpoint (prefix optional, other entries of
    the checkpoint are not accepted). first_stage_config: `model.params.first_stage_config` of the yaml.
    scale_factor: the LDM's latent scale (`ldm_scale_factor`), kept as `model.config.scaling_factor`.
    Strict: missing, unexpected or mis-shaped weights raise, named in CompVis terms.
    """
    kind = first_stage_kind(first_stage_config)
    cls, kwargs = first_stage_kwargs(first_stage_config, scale_factor=scale_factor)
    weights = compvis_to_diffusers_first_stage(state_dict, kind)
    model = cls(**kwargs)
    n_levels = len(kwargs["block_out_channels"])
    expected = model.state_dict()

    def compvis_name(key: str) -> str:
        return diffusers_key_to_compvis(key, kind, n_levels) or key

    missing = sorted(compvis_name(k) for k in expected.keys() - weights.keys())
    unexpected = sorted(compvis_name(k) for k in weights.keys() - expected.keys())
    mis_shaped = sorted(f"{compvis_name(k)}: checkpoint {tuple(weights[k].shape)}, config {tuple(expected[k].shape)}"
                        for k in expected.keys() & weights.keys() if weights[k].shape != expected[k].shape)
    problems = [f"{label} ({len(names)}): {', '.join(names[:40])}{' ...' if len(names) > 40 else ''}"
                for label, names in (("missing from the checkpoint", missing),
                                     ("in the checkpoint but not in the config", unexpected),
                                     ("shape differs", mis_shaped)) if names]
    if problems:
        raise UserError(f"CompVis {kind.upper()} first-stage weights do not fit first_stage_config "
                         f"({cls.__name__} {kwargs['block_out_channels']}): " + "; ".join(problems))
    model.load_state_dict(weights, strict=True)
    return model.eval()


def load_first_stage_from_ldm(checkpoint_state_dict: Mapping[str, torch.Tensor],
                              ldm_params: Mapping) -> VQModel | AutoencoderKL:
    """The first stage of a whole CompVis LDM checkpoint: its `first_stage_model.*` weights, the yaml's
    `model.params.first_stage_config`, and the latent scale (`ldm_scale_factor`) as config.scaling_factor."""
    params = to_plain(ldm_params)
    if not isinstance(params, Mapping) or "first_stage_config" not in params:
        raise UserError("ldm_params must be `model.params` of a CompVis LDM yaml, with a first_stage_config")
    return load_first_stage_from_compvis(select_first_stage(checkpoint_state_dict), params["first_stage_config"],
                                         scale_factor=ldm_scale_factor(params, checkpoint_state_dict))


def first_stage_from_diffusers_model(model: VQModel | AutoencoderKL, scale_factor: float | None = None) -> FirstStage:
    """The run's FirstStage (latents -> uint8 NHWC) around a diffusers VQModel / AutoencoderKL.

    scale_factor, when given, replaces model.config.scaling_factor (decode divides by it). For a
    VQModel the diffusion latents are the quant_conv outputs: `latent_channels` is its vq_embed_dim,
    and decode quantizes them first, as CompVis VQModelInterface.decode does.
    """
    if not isinstance(model, (VQModel, AutoencoderKL)):
        raise TypeError(f"expected a diffusers VQModel or AutoencoderKL, got {type(model).__name__}")
    if scale_factor is not None:
        model.register_to_config(scaling_factor=float(scale_factor))
    stage = FirstStage(model)
    if isinstance(model, VQModel):
        stage.latent_channels = int(model.config.vq_embed_dim or model.config.latent_channels)
    return stage


__all__ = ["first_stage_kind", "first_stage_kwargs", "ldm_scale_factor", "load_first_stage_from_compvis",
           "load_first_stage_from_ldm", "first_stage_from_diffusers_model"]
