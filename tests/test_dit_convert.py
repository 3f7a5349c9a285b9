"""dit.convert: official <-> diffusers DiTTransformer2DModel, checked against diffusers' own forward."""
from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import DiTTransformer2DModel

from dit import build_dit
from dit.checkpoints import load_state_dict_checked
from dit.convert import (
    diffusers_to_official,
    load_diffusers_dit,
    official_kwargs_from_diffusers_config,
    official_to_diffusers,
)
from dit.models import DiT

from conftest import randomize

CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    sample_size=8,
    patch_size=2,
    num_layers=2,
    num_embeds_ada_norm=10,
    norm_type="ada_norm_zero",
)


def tiny_diffusers(seed=0, **overrides):
    """Random diffusers DiT whose per-block embedder copies are identical (as in real checkpoints)."""
    model = randomize(DiTTransformer2DModel(**{**CONFIG, **overrides}), seed).eval()
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    return model


def to_official(dmodel) -> DiT:
    config = dict(dmodel.config)
    model = DiT(**official_kwargs_from_diffusers_config(config)).eval()
    load_state_dict_checked(model, diffusers_to_official(dmodel.state_dict(), config), "test")
    return model


def make_diffusers_official_maths(dmodel) -> None:
    """Remove the two known numerical differences of diffusers' DiT."""
    for block in dmodel.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # frequencies / half, not / (half - 1)
        block.norm3.eps = 1e-6                                # pre-MLP LayerNorm eps (diffusers: norm_eps=1e-5)


def inputs(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 421, 999])[:n]
    y = torch.tensor([0, 7, 10])[:n]  # 10 = null class
    return x, t, y


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_converted_model_matches_diffusers_after_removing_known_differences():
    dmodel = tiny_diffusers()
    ours = to_official(dmodel)
    make_diffusers_official_maths(dmodel)
    x, t, y = inputs()
    want = dmodel(x, timestep=t, class_labels=y).sample
    got = ours(x, t, y)
    assert got.shape == want.shape == (3, 8, 8, 8)
    assert rel_err(got, want) < 1e-5


@torch.no_grad()
def test_diffusers_differs_from_official_by_a_small_bounded_amount():
    # Measured on this tiny random model (torch 2.14 CPU, diffusers 0.42.1, seeds 0-2), as
    # max |diff| / max |official output|:
    #   stock diffusers vs official:                       0.14 - 0.30 (almost all from the next line)
    #   timestep frequencies / (half - 1) instead of / half: same 0.14 - 0.30; at t=999 the phase of
    #     the highest frequency moves by ~8 rad, so the 256-d time features are largely different;
    #   pre-MLP LayerNorm eps 1e-5 instead of 1e-6 alone:  1.6e-6 - 2.5e-6;
    #   both removed: 0.0 (bitwise equal on CPU).
    # The size on real checkpoints depends on how much the trained model relies on t.
    x, t, y = inputs()
    stock = tiny_diffusers()
    ours = to_official(stock)
    got = ours(x, t, y)
    total = rel_err(got, stock(x, timestep=t, class_labels=y).sample)

    only_eps = tiny_diffusers()
    for block in only_eps.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    eps_part = rel_err(got, only_eps(x, timestep=t, class_labels=y).sample)

    assert 1e-2 < total < 1.0, total
    assert 0 < eps_part < 1e-5, eps_part


@torch.no_grad()
def test_timestep_zero_is_unaffected_by_frequency_shift():
    # At t=0 every sinusoid is cos(0)=1 / sin(0)=0, so the frequency convention cannot matter.
    dmodel = tiny_diffusers()
    ours = to_official(dmodel)
    for block in dmodel.transformer_blocks:
        block.norm3.eps = 1e-6
    x, _, y = inputs()
    t = torch.zeros(3, dtype=torch.long)
    assert rel_err(ours(x, t, y), dmodel(x, timestep=t, class_labels=y).sample) < 1e-5


def test_round_trip_official_diffusers_official_is_exact():
    official = randomize(DiT(**official_kwargs_from_diffusers_config(CONFIG)))
    sd = {k: v.clone() for k, v in official.state_dict().items()}
    dsd, config = official_to_diffusers(sd, num_heads=2)
    back = diffusers_to_official(dsd, config)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_official_to_diffusers_loads_strictly_into_diffusers():
    official = randomize(DiT(**official_kwargs_from_diffusers_config(CONFIG)))
    dsd, config = official_to_diffusers(official.state_dict(), num_heads=2)
    for key, value in CONFIG.items():
        assert config[key] == value, key
    assert config["norm_eps"] == 1e-6
    dmodel = DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = dmodel.load_state_dict(dsd, strict=True)
    assert not missing and not unexpected
    # ...and diffusers -> official -> diffusers is exact too.
    again, _ = official_to_diffusers(diffusers_to_official(dmodel.state_dict(), config), num_heads=2)
    ref = dmodel.state_dict()
    assert again.keys() == ref.keys()
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_num_heads_inferred_only_for_official_widths():
    small = DiT(input_size=8, patch_size=8, hidden_size=384, depth=1, num_heads=6, num_classes=10)
    assert official_to_diffusers(small.state_dict())[1]["num_attention_heads"] == 6
    tiny = DiT(**official_kwargs_from_diffusers_config(CONFIG))
    with pytest.raises(ValueError, match="num_heads"):
        official_to_diffusers(tiny.state_dict())


def test_label_table_without_null_row_is_refused():
    no_null = DiT(**{**official_kwargs_from_diffusers_config(CONFIG), "class_dropout_prob": 0.0})
    with pytest.raises(ValueError, match="null-class"):
        official_to_diffusers(no_null.state_dict(), num_heads=2, num_classes=10)


def test_non_standard_pos_embed_is_refused():
    # diffusers does not store pos_embed, so a modified table would be silently lost.
    official = DiT(**official_kwargs_from_diffusers_config(CONFIG))
    sd = dict(official.state_dict())
    sd["pos_embed"] = sd["pos_embed"] + 0.01
    with pytest.raises(ValueError, match="pos_embed"):
        official_to_diffusers(sd, num_heads=2)


def test_qkv_split_order_is_q_k_v():
    official = randomize(DiT(**official_kwargs_from_diffusers_config(CONFIG)))
    qkv = official.blocks[1].attn.qkv.weight  # (3D, D)
    dsd, _ = official_to_diffusers(official.state_dict(), num_heads=2)
    d = qkv.shape[1]
    assert torch.equal(dsd["transformer_blocks.1.attn1.to_q.weight"], qkv[:d])
    assert torch.equal(dsd["transformer_blocks.1.attn1.to_k.weight"], qkv[d:2 * d])
    assert torch.equal(dsd["transformer_blocks.1.attn1.to_v.weight"], qkv[2 * d:])


def test_differing_embedder_copies_are_refused():
    dmodel = randomize(DiTTransformer2DModel(**CONFIG))  # copies differ between blocks
    with pytest.raises(ValueError, match=r"timestep_embedder.*differ.*blocks \[1\]"):
        diffusers_to_official(dmodel.state_dict(), dict(dmodel.config))


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="norm_elementwise_affine"):
        official_kwargs_from_diffusers_config({**CONFIG, "norm_elementwise_affine": True})


@torch.no_grad()
def test_save_pretrained_folder_loads_through_build_dit(tmp_path):
    dmodel = tiny_diffusers()
    folder = tmp_path / "dit_diffusers"
    dmodel.save_pretrained(folder)

    sd, config = load_diffusers_dit(folder)
    assert config["num_layers"] == 2 and sd.keys() == dmodel.state_dict().keys()

    ours = build_dit(None, ckpt=folder)  # architecture from config.json
    # Also a pipeline folder (weights under transformer/), with an explicit matching build.
    pipe = tmp_path / "pipeline"
    shutil.copytree(folder, pipe / "transformer")
    ours_pipe = build_dit(None, ckpt=pipe)

    make_diffusers_official_maths(dmodel)
    x, t, y = inputs()
    want = dmodel(x, timestep=t, class_labels=y).sample
    assert rel_err(ours(x, t, y), want) < 1e-5
    assert torch.equal(ours_pipe(x, t, y), ours(x, t, y))
    assert not torch.allclose(ours(x, t, y), ours(x, t, y.flip(0)))  # the labels act: the equality can fail
    assert not ours.training


def test_build_dit_with_folder_of_other_architecture_fails(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="attention heads"):
        build_dit("DiT-S/2", input_size=8, num_classes=10, ckpt=tmp_path / "tiny")
    # same head count but different widths: caught by the key/shape check
    tiny_diffusers(num_attention_heads=6, attention_head_dim=8).save_pretrained(tmp_path / "six")
    with pytest.raises(ValueError, match=r"shape mismatches.*checkpoint \(48,") as info:
        build_dit("DiT-S/2", input_size=8, num_classes=10, ckpt=tmp_path / "six")
    assert "missing keys" in str(info.value)  # 2 blocks in the folder vs 12 in DiT-S/2
