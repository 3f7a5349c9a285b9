"""ldm.first_stage(_convert): CompVis VQ / KL first stages as diffusers VQModel / AutoencoderKL.

References that are not our code: diffusers' models and its own single-file VAE converter
(`convert_ldm_vae_checkpoint`, KL only, attention only in the mid block) and config builder; the CompVis
key layout written out below from the CompVis Encoder/Decoder/AttnBlock/ResnetBlock/VectorQuantizer2
source; and, where pip's `taming-transformers-rom1504` is installed, taming's Encoder/Decoder/
VectorQuantizer2 (the modules the CompVis LDM first stage is built from) run side by side.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from diffusion.vae import decode_to_uint8, to_uint8
from ldm.first_stage import (
    first_stage_from_diffusers_model,
    first_stage_kind,
    first_stage_kwargs,
    ldm_scale_factor,
    load_first_stage_from_compvis,
    load_first_stage_from_ldm,
)
from ldm.first_stage_convert import (
    compvis_to_diffusers_first_stage,
    diffusers_to_compvis_first_stage,
    select_first_stage,
)

from conftest import randomize

# 2 levels at resolution 16: level 0 at 16x16, level 1 (the bottom) at 8x8 with attention.
TINY_DD = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def vq_config(embed_dim=2, n_embed=16, **dd):
    return {"target": "ldm.models.autoencoder.VQModelInterface",
            "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": {**TINY_DD, **dd},
                       "lossconfig": {"target": "torch.nn.Identity"}}}


def kl_config(embed_dim=4, **dd):
    dd = {**TINY_DD, "double_z": True, "z_channels": 4, **dd}
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": embed_dim, "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}}


def tiny_model(config, seed=0, scale_factor=1.0):
    cls, kwargs = first_stage_kwargs(config, scale_factor=scale_factor)
    return randomize(cls(**kwargs), seed).eval()


# ---- the CompVis key layout, written from the CompVis module definitions, not from the converter ----

def _resnet(path, c_in, c_out):
    """CompVis ResnetBlock(temb_channels=0): norm1 conv1 norm2 conv2 (+ 1x1 nin_shortcut if widths differ)."""
    keys = {f"{path}.norm1.weight": (c_in,), f"{path}.norm1.bias": (c_in,),
            f"{path}.conv1.weight": (c_out, c_in, 3, 3), f"{path}.conv1.bias": (c_out,),
            f"{path}.norm2.weight": (c_out,), f"{path}.norm2.bias": (c_out,),
            f"{path}.conv2.weight": (c_out, c_out, 3, 3), f"{path}.conv2.bias": (c_out,)}
    if c_in != c_out:
        keys |= {f"{path}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{path}.nin_shortcut.bias": (c_out,)}
    return keys


def _attn(path, c):
    """CompVis AttnBlock: GroupNorm `norm` and four 1x1 convs q, k, v, proj_out."""
    keys = {f"{path}.norm.weight": (c,), f"{path}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        keys |= {f"{path}.{name}.weight": (c, c, 1, 1), f"{path}.{name}.bias": (c,)}
    return keys


def _conv(path, c_out, c_in, k):
    return {f"{path}.weight": (c_out, c_in, k, k), f"{path}.bias": (c_out,)}


def _norm(path, c):
    return {f"{path}.weight": (c,), f"{path}.bias": (c,)}


def compvis_tiny_keys(kind):
    """Every parameter of CompVis VQModelInterface / AutoencoderKL for TINY_DD (ch 32, ch_mult [1, 2],
    num_res_blocks 1, attention at 8x8 = level 1), with z_channels z and embed_dim e as in the configs."""
    z, e = (3, 2) if kind == "vq" else (4, 4)
    keys = {}
    # Encoder: conv_in; level 0 (32 -> 32, then Downsample); level 1 (32 -> 64, AttnBlock after the block);
    # mid block_1, attn_1, block_2; norm_out; conv_out to z (2z with double_z for KL)
    keys |= _conv("encoder.conv_in", 32, 3, 3)
    keys |= _resnet("encoder.down.0.block.0", 32, 32)
    keys |= _conv("encoder.down.0.downsample.conv", 32, 32, 3)
    keys |= _resnet("encoder.down.1.block.0", 32, 64)
    keys |= _attn("encoder.down.1.attn.0", 64)
    keys |= _resnet("encoder.mid.block_1", 64, 64) | _attn("encoder.mid.attn_1", 64)
    keys |= _resnet("encoder.mid.block_2", 64, 64)
    keys |= _norm("encoder.norm_out", 64) | _conv("encoder.conv_out", z if kind == "vq" else 2 * z, 64, 3)
    # Decoder: conv_in z -> 64; mid; up.1 (bottom, run first): 2 blocks 64 -> 64 each followed by an
    # AttnBlock, then Upsample; up.0: 64 -> 32, 32 -> 32; norm_out; conv_out to out_ch
    keys |= _conv("decoder.conv_in", 64, z, 3)
    keys |= _resnet("decoder.mid.block_1", 64, 64) | _attn("decoder.mid.attn_1", 64)
    keys |= _resnet("decoder.mid.block_2", 64, 64)
    keys |= _resnet("decoder.up.1.block.0", 64, 64) | _attn("decoder.up.1.attn.0", 64)
    keys |= _resnet("decoder.up.1.block.1", 64, 64) | _attn("decoder.up.1.attn.1", 64)
    keys |= _conv("decoder.up.1.upsample.conv", 64, 64, 3)
    keys |= _resnet("decoder.up.0.block.0", 64, 32) | _resnet("decoder.up.0.block.1", 32, 32)
    keys |= _norm("decoder.norm_out", 32) | _conv("decoder.conv_out", 3, 32, 3)
    if kind == "vq":  # VQModel: quant_conv z -> e, VectorQuantizer2.embedding (n_embed, e), post_quant_conv e -> z
        keys |= _conv("quant_conv", e, z, 1) | _conv("post_quant_conv", z, e, 1)
        keys["quantize.embedding.weight"] = (16, e)
    else:  # AutoencoderKL: quant_conv 2z -> 2e (moments), post_quant_conv e -> z
        keys |= _conv("quant_conv", 2 * e, 2 * z, 1) | _conv("post_quant_conv", z, e, 1)
    return keys


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_converter_writes_the_compvis_key_layout(kind):
    model = tiny_model(vq_config() if kind == "vq" else kl_config())
    compvis = diffusers_to_compvis_first_stage(model.state_dict(), kind)
    expected = compvis_tiny_keys(kind)
    assert sorted(compvis) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in compvis.items()} == expected


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_round_trips_are_identity(kind):
    # 3 levels with attention at the middle level (8x8) only, and for VQ z_channels 3 != embed_dim 2
    dd = dict(ch_mult=[1, 2, 2], attn_resolutions=[8])
    model = tiny_model(vq_config(**dd) if kind == "vq" else kl_config(**dd))
    assert sum("attentions" in k for k in model.state_dict()) > 0
    source = model.state_dict()
    compvis = diffusers_to_compvis_first_stage(source, kind)
    back = compvis_to_diffusers_first_stage(compvis, kind)
    assert back.keys() == source.keys()
    assert all(torch.equal(back[k], source[k]) for k in source)
    again = diffusers_to_compvis_first_stage(back, kind)
    assert again.keys() == compvis.keys()
    assert all(torch.equal(again[k], compvis[k]) for k in compvis)
    # up-block order is reversed: CompVis up.2 (bottom) is diffusers up_blocks.0
    assert torch.equal(compvis["decoder.up.2.block.0.conv1.weight"],
                       source["decoder.up_blocks.0.resnets.0.conv1.weight"])


def test_prefixed_keys_and_training_only_loss_entries_are_accepted():
    model = tiny_model(vq_config())
    compvis = diffusers_to_compvis_first_stage(model.state_dict(), "vq")
    prefixed = {f"first_stage_model.{k}": v for k, v in compvis.items()}
    prefixed["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(1)
    plain = compvis_to_diffusers_first_stage(compvis, "vq")
    converted = compvis_to_diffusers_first_stage(prefixed, "vq")
    assert converted.keys() == plain.keys() and all(torch.equal(converted[k], plain[k]) for k in plain)


def test_kl_matches_diffusers_own_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = kl_config(attn_resolutions=[])  # diffusers' converter maps attention in the mid block only
    model = tiny_model(config)
    cls, kwargs = first_stage_kwargs(config, scale_factor=1.0)
    compvis = diffusers_to_compvis_first_stage(model.state_dict(), "kl")
    theirs = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in compvis.items()}, kwargs)
    ours = compvis_to_diffusers_first_stage(compvis, "kl")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    reloaded = cls(**kwargs)
    reloaded.load_state_dict(theirs, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x, sample_posterior=False).sample, model(x, sample_posterior=False).sample)


def test_config_matches_diffusers_ldm_vae_config_for_stable_diffusion():
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    sd_first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss",
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}
    original = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": sd_first_stage}}}
    theirs = create_vae_diffusers_config_from_ldm(original, {})
    cls, ours = first_stage_kwargs(sd_first_stage, scale_factor=ldm_scale_factor(original["model"]["params"]))
    assert cls is AutoencoderKL
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "scaling_factor"):
        assert ours[name] == theirs[name], name
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
        assert list(ours[name]) == list(theirs[name]), name
    # sample_size: ours is ddconfig.resolution (256); diffusers guesses 512 for SD v1 (only used for tiling)


def test_cin256_and_vq_f8_configs():
    cin256 = {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 8192,
        "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}
    cls, kw = first_stage_kwargs(cin256, scale_factor=1.0)
    assert cls is VQModel and first_stage_kind(cin256) == "vq"
    assert kw["block_out_channels"] == (128, 256, 512) and kw["layers_per_block"] == 2
    assert kw["latent_channels"] == 3 and kw["vq_embed_dim"] == 3 and kw["num_vq_embeddings"] == 8192
    assert kw["down_block_types"] == ("DownEncoderBlock2D",) * 3 and kw["up_block_types"] == ("UpDecoderBlock2D",) * 3
    assert kw["scaling_factor"] == 1.0

    vq_f8 = copy.deepcopy(cin256)
    vq_f8["params"].update(embed_dim=4, n_embed=16384)
    vq_f8["params"]["ddconfig"].update(z_channels=4, ch_mult=[1, 2, 2, 4], attn_resolutions=[32])
    _, kw = first_stage_kwargs(vq_f8)
    # 256 -> 128 -> 64 -> 32: attention at the bottom level, which diffusers' decoder runs first
    assert kw["down_block_types"] == ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",)
    assert kw["up_block_types"] == ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3
    assert "scaling_factor" not in kw


def test_encoder_and_decoder_attention_levels_follow_compvis_rounding():
    # resolution 10, 3 levels: the CompVis encoder sees 10, 5, 2 and the decoder 2, 4, 8
    _, kw = first_stage_kwargs(vq_config(resolution=10, ch_mult=[1, 1, 1], attn_resolutions=[5, 8]))
    assert kw["down_block_types"] == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D")
    # diffusers up blocks run bottom-up: CompVis levels 2 (2x2), 1 (4x4), 0 (8x8)
    assert kw["up_block_types"] == ("UpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D")
    _, kw = first_stage_kwargs(vq_config(attn_type="none"))
    assert kw["mid_block_add_attention"] is False and "AttnDownEncoderBlock2D" not in kw["down_block_types"]


def test_loaded_vq_model_decodes_as_its_source_and_quantizes():
    config = vq_config()
    source = tiny_model(config)
    compvis = {f"first_stage_model.{k}": v for k, v in
               diffusers_to_compvis_first_stage(source.state_dict(), "vq").items()}
    model = load_first_stage_from_compvis(compvis, config, scale_factor=1.0)
    assert isinstance(model, VQModel) and not model.training and model.config.scaling_factor == 1.0
    z = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.decode(z).sample, source.decode(z).sample)
        assert torch.equal(model.encode(x).latents, source.encode(x).latents)

        # CompVis VQModelInterface.decode(z) quantizes first (force_not_quantize=False): nearest codebook
        # entry by taming's VectorQuantizer2 distance |z|^2 + |e|^2 - 2 z.e, written out here
        codebook = model.quantize.embedding.weight  # (n_embed, embed_dim)
        flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
        distance = (flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * flat @ codebook.T
        snapped = codebook[distance.argmin(1)].reshape(2, 8, 8, 2).permute(0, 3, 1, 2)
        assert not torch.allclose(snapped, z)
        by_hand = model.decode(snapped, force_not_quantize=True).sample
        torch.testing.assert_close(model.decode(z).sample, by_hand, rtol=0, atol=1e-6)

    stage = first_stage_from_diffusers_model(model)
    assert stage.latent_channels == 2 and stage.factor == 2  # embed_dim, 2 levels
    images = stage.decode(z)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(images, decode_to_uint8(source, z, scaling_factor=1.0))


def test_kl_load_keeps_the_ldm_scale_factor():
    config = kl_config()
    source = tiny_model(config)
    compvis = diffusers_to_compvis_first_stage(source.state_dict(), "kl")
    scale = ldm_scale_factor({"scale_factor": 0.18215})
    model = load_first_stage_from_compvis(compvis, config, scale_factor=scale)
    assert isinstance(model, AutoencoderKL) and model.config.scaling_factor == pytest.approx(0.18215)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    stage = first_stage_from_diffusers_model(model)
    assert stage.latent_channels == 4 and stage.factor == 2
    with torch.no_grad():
        np.testing.assert_array_equal(stage.decode(z), to_uint8(source.decode(z / 0.18215).sample))
    # an explicit scale replaces the model's
    assert first_stage_from_diffusers_model(model, scale_factor=0.5).vae.config.scaling_factor == 0.5


def test_ldm_scale_factor_rules():
    assert ldm_scale_factor({}) == 1.0  # LatentDiffusion's default, as in the cin256 VQ yamls
    assert ldm_scale_factor({"scale_factor": 0.18215}) == pytest.approx(0.18215)
    # scale_by_std: the checkpoint's buffer wins over the yaml's initial value
    assert ldm_scale_factor({"scale_by_std": True, "scale_factor": 1.0},
                            {"scale_factor": torch.tensor(0.25)}) == 0.25
    with pytest.raises(KeyError, match="scale_factor"):
        ldm_scale_factor({"scale_by_std": True}, {})


def test_whole_ldm_checkpoint_gives_its_first_stage_and_scale():
    config = vq_config()
    source = tiny_model(config)
    checkpoint = {f"first_stage_model.{k}": v for k, v in
                  diffusers_to_compvis_first_stage(source.state_dict(), "vq").items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 3, 3, 3)  # the U-Net
    checkpoint["cond_stage_model.embedding.weight"] = torch.zeros(10, 8)  # the class embedder
    checkpoint["scale_factor"] = torch.tensor(0.5)  # scale_by_std's buffer
    params = {"scale_by_std": True, "scale_factor": 1.0, "first_stage_config": config,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel"}}
    model = load_first_stage_from_ldm(checkpoint, params)
    assert model.config.scaling_factor == 0.5
    z = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model.decode(z).sample, source.decode(z).sample)
    with pytest.raises(KeyError, match="no 'first_stage_model.' entries"):
        select_first_stage({"model.diffusion_model.out.2.weight": torch.zeros(1)})


# ---- bad input ----

def _compvis(kind="vq", **dd):
    config = vq_config(**dd) if kind == "vq" else kl_config(**dd)
    return diffusers_to_compvis_first_stage(tiny_model(config).state_dict(), kind), config


def test_missing_keys_are_named():
    compvis, config = _compvis()
    del compvis["decoder.up.1.upsample.conv.bias"]
    del compvis["encoder.down.1.attn.0.q.weight"]
    with pytest.raises(KeyError, match=r"decoder\.up\.1\.upsample\.conv\.bias") as err:
        compvis_to_diffusers_first_stage(compvis, "vq")
    assert "encoder.down.1.attn.0.q.weight" in str(err.value)
    with pytest.raises(KeyError, match=r"decoder\.up\.1\.upsample\.conv\.bias"):
        load_first_stage_from_compvis(compvis, config, scale_factor=1.0)

    # a whole attention block gone looks like a level without attention to the converter;
    # the loader, which knows the config, names it
    compvis, config = _compvis()
    for name in [k for k in compvis if k.startswith("encoder.down.1.attn.0.")]:
        del compvis[name]
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*encoder\.down\.1\.attn\.0\.q\.weight"):
        load_first_stage_from_compvis(compvis, config, scale_factor=1.0)

    compvis, _ = _compvis()
    del compvis["quantize.embedding.weight"]
    with pytest.raises(KeyError, match=r"quantize\.embedding\.weight"):
        compvis_to_diffusers_first_stage(compvis, "vq")

    diffusers_sd = tiny_model(vq_config()).state_dict()
    del diffusers_sd["decoder.up_blocks.0.resnets.1.conv2.weight"]
    with pytest.raises(KeyError, match=r"decoder\.up_blocks\.0\.resnets\.1\.conv2\.weight"):
        diffusers_to_compvis_first_stage(diffusers_sd, "vq")


def test_unknown_keys_and_kind_are_named():
    compvis, _ = _compvis()
    compvis["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 4)
    with pytest.raises(ValueError, match=r"encoder\.down\.0\.block\.0\.temb_proj\.weight"):
        compvis_to_diffusers_first_stage(compvis, "vq")
    compvis, _ = _compvis()
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight"):  # a codebook in a KL first stage
        compvis_to_diffusers_first_stage(compvis, "kl")
    compvis, _ = _compvis()
    compvis["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight"):
        compvis_to_diffusers_first_stage(compvis, "vq")
    with pytest.raises(ValueError, match=r"'ae'.*'vq', 'kl'"):
        compvis_to_diffusers_first_stage(compvis, "ae")
    with pytest.raises(ValueError, match=r"'ae'.*'vq', 'kl'"):
        diffusers_to_compvis_first_stage({}, "ae")


def test_bad_attention_kernel_shape_is_named():
    compvis, _ = _compvis()
    compvis["decoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(ValueError, match=r"decoder\.mid\.attn_1\.q\.weight.*\(64, 64, 3, 3\)"):
        compvis_to_diffusers_first_stage(compvis, "vq")


def test_config_that_does_not_fit_the_weights_is_named():
    compvis, _ = _compvis()
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: checkpoint \(16, 2\), config \(32, 2\)"):
        load_first_stage_from_compvis(compvis, vq_config(n_embed=32), scale_factor=1.0)
    with pytest.raises(ValueError, match=r"encoder\.down\.1\.attn\.0\.q\.weight"):  # config has no attention there
        load_first_stage_from_compvis(compvis, vq_config(attn_resolutions=[]), scale_factor=1.0)


@pytest.mark.parametrize("config, message", [
    (vq_config(tanh_out=True), r"tanh_out=True"),
    (vq_config(give_pre_end=True), r"give_pre_end=True"),
    (vq_config(resamp_with_conv=False), r"resamp_with_conv=False"),
    (vq_config(attn_type="linear"), r"attn_type='linear'"),
    (vq_config(use_linear_attn=True), r"attn_type='linear'"),
    (vq_config(double_z=True), r"double_z=True"),
    (kl_config(double_z=False), r"double_z=False"),
    (kl_config(embed_dim=3), r"embed_dim=3 != ddconfig.z_channels=4"),
    (vq_config(ch=24), r"ch=24.*\[24, 48\]"),
    (vq_config(num_res_blocks=0), r"num_res_blocks=0"),
    ({"target": "ldm.models.autoencoder.IdentityFirstStage", "params": {}}, r"IdentityFirstStage.*pixel space"),
    ({"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {}},
     r"'sgm\.models\.autoencoder\.AutoencoderKLInferenceWrapper'"),
])
def test_unsupported_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        first_stage_kwargs(config)


def test_unsupported_vq_params_are_named():
    config = vq_config()
    config["params"]["remap"] = "data/used_indices.npy"
    with pytest.raises(ValueError, match=r"remap='data/used_indices\.npy'"):
        first_stage_kwargs(config)
    config = vq_config()
    del config["params"]["n_embed"]
    with pytest.raises(ValueError, match="n_embed"):
        first_stage_kwargs(config)


def test_omegaconf_config_is_accepted():
    from omegaconf import OmegaConf

    config = vq_config()
    assert first_stage_kwargs(OmegaConf.create(config)) == first_stage_kwargs(config)


# ---- side by side with taming's modules (the CompVis first stage's building blocks) ----

class _TamingFirstStage(torch.nn.Module):
    """CompVis VQModelInterface / AutoencoderKL inference modules, assembled from taming's classes with
    the attribute names of ldm/models/autoencoder.py (encoder, decoder, quant_conv, quantize,
    post_quant_conv)."""

    def __init__(self, config):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        params, dd = config["params"], config["params"]["ddconfig"]
        self.kind, e, z = first_stage_kind(config), params["embed_dim"], dd["z_channels"]
        self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
        if self.kind == "vq":
            self.quantize = VectorQuantizer2(params["n_embed"], e, beta=0.25)
            self.quant_conv = torch.nn.Conv2d(z, e, 1)
        else:
            self.quant_conv = torch.nn.Conv2d(2 * z, 2 * e, 1)
        self.post_quant_conv = torch.nn.Conv2d(e, z, 1)

    def encode(self, x):  # VQ: pre-quantization latents; KL: the posterior's mean
        h = self.quant_conv(self.encoder(x))
        return h if self.kind == "vq" else h.chunk(2, dim=1)[0]

    def decode(self, h):  # VQModelInterface.decode(h, force_not_quantize=False) / AutoencoderKL.decode
        if self.kind == "vq":
            h = self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(h))


@pytest.mark.parametrize("kind, dd", [
    ("vq", {}),
    ("vq", dict(resolution=10, ch_mult=[1, 1, 1], attn_resolutions=[5, 4])),  # encoder / decoder levels differ
    ("kl", dict(ch_mult=[1, 2, 2], attn_resolutions=[8])),  # attention at a middle level
])
def test_matches_taming_modules(kind, dd, taming_modules):
    config = vq_config(**dd) if kind == "vq" else kl_config(**dd)
    torch.manual_seed(0)
    reference = randomize(_TamingFirstStage(config), seed=5).eval()
    cls, kwargs = first_stage_kwargs(config)
    expected_layout = diffusers_to_compvis_first_stage(cls(**kwargs).state_dict(), kind)
    assert {k: v.shape for k, v in expected_layout.items()} == {k: v.shape for k, v in reference.state_dict().items()}

    model = load_first_stage_from_compvis(reference.state_dict(), config, scale_factor=1.0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        latents = reference.encode(x)
        ours = model.encode(x).latents if kind == "vq" else model.encode(x).latent_dist.mean
        torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-5)
        z = latents * 4 if kind == "vq" else latents  # spread VQ latents over the codebook
        torch.testing.assert_close(model.decode(z).sample, reference.decode(z), rtol=1e-4, atol=1e-5)
