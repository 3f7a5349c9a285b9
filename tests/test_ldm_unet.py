"""The native LDM U-Net against diffusers' UNet2DConditionModel through diffusers' own CompVis converter."""
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

from diffusion.attention import find_attention
from ldm import UNetModel, unet_from_params
from ldm.transformer import AttentionBlock

from ldm_tiny import TINY_UNET, TINY_UNET_HEAD_CHANNELS, randomized_unet


def diffusers_twin(unet: UNetModel, params: dict) -> UNet2DConditionModel:
    """Our CompVis-layout weights through diffusers' converter into its UNet (strict: every key maps)."""
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    if params.get("num_head_channels", -1) != -1 and not params.get("use_linear_in_transformer"):
        # diffusers derives heads only from num_heads here; give it the per-level head counts CompVis uses
        width = params["model_channels"]
        config["attention_head_dim"] = [width * m // params["num_head_channels"] for m in params["channel_mult"]]
    twin = UNet2DConditionModel(**config).eval()
    twin.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return twin


@pytest.mark.parametrize("params", [
    TINY_UNET,
    TINY_UNET_HEAD_CHANNELS,
    {**{k: v for k, v in TINY_UNET.items() if k != "num_heads"},                   # SD 2.x form
     "use_linear_in_transformer": True, "num_head_channels": 16},
    dict(TINY_UNET, attention_resolutions=[2], channel_mult=[1, 2, 2], transformer_depth=2),
], ids=["num_heads", "num_head_channels", "linear_proj", "deeper"])
def test_unet_matches_diffusers_through_its_compvis_converter(params):
    ours = randomized_unet(params)
    twin = diffusers_twin(ours, params)
    gen = torch.Generator().manual_seed(1)
    levels = 2 ** (len(params["channel_mult"]) - 1)
    x = torch.randn(2, 4, 4 * levels, 4 * levels, generator=gen)
    t = torch.tensor([3.0, 741.0])
    context = torch.randn(2, 3, params["context_dim"], generator=gen)
    with torch.no_grad():
        got = ours(x, t, context=context)
        want = twin(x, t, encoder_hidden_states=context).sample
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
    assert want.abs().mean() > 0.1  # a real signal, not two zero outputs


def test_state_dict_is_the_compvis_layout():
    keys = set(randomized_unet(TINY_UNET_HEAD_CHANNELS).state_dict())
    # names from CompVis's openaimodel / attention modules
    for key in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.2.bias",
                "input_blocks.1.1.transformer_blocks.0.norm3.weight",
                "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "middle_block.0.in_layers.2.weight", "middle_block.1.proj_out.weight",
                "middle_block.2.out_layers.3.bias",
                "output_blocks.0.0.skip_connection.weight", "output_blocks.2.2.conv.weight",
                "out.0.weight", "out.2.weight"]:
        assert key in keys, key


def _compvis_qkv_attention(qkv, heads, legacy):
    """CompVis QKVAttentionLegacy / QKVAttention, einsum form, float64."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_plain_attention_block_matches_compvis_maths(new_order):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        got = block(x)
        flat = x.reshape(2, 64, -1).double()
        normed = torch.nn.functional.group_norm(flat, 32, block.norm.weight.double(), block.norm.bias.double(), 1e-5)
        qkv = torch.nn.functional.conv1d(normed, block.qkv.weight.double(), block.qkv.bias.double())
        h = _compvis_qkv_attention(qkv, 4, legacy=not new_order)
        want = (flat + torch.nn.functional.conv1d(h, block.proj_out.weight.double(), block.proj_out.bias.double()))
    torch.testing.assert_close(got, want.reshape(x.shape).float(), rtol=1e-5, atol=1e-5)


def test_unconditional_unet_with_plain_attention_and_label_embedding_runs():
    params = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=2, num_classes=5, resblock_updown=True,
                  use_scale_shift_norm=True)
    unet = unet_from_params(params)
    assert "label_emb.weight" in unet.state_dict() and "input_blocks.2.0.h_upd" not in unet.state_dict()
    out = unet(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), y=torch.tensor([0, 4]))
    assert out.shape == (2, 3, 8, 8)


def test_attention_modules_are_findable_for_tgate():
    found = dict(find_attention(UNetModel(**TINY_UNET)))
    cross = [n for n, m in found.items() if m.is_cross_attention]
    selfs = [n for n, m in found.items() if not m.is_cross_attention]
    assert cross and len(cross) == len(selfs)
    assert all(n.endswith("attn2") for n in cross) and all(n.endswith("attn1") for n in selfs)


def test_bad_inputs_are_refused_with_names():
    with pytest.raises(ValueError, match=r"does not take: \['use_bogus_flag'\]"):
        unet_from_params(dict(TINY_UNET, use_bogus_flag=True))
    with pytest.raises(ValueError, match=r"lacks required arguments of UNetModel: \['model_channels'\]"):
        unet_from_params({k: v for k, v in TINY_UNET.items() if k != "model_channels"})
    with pytest.raises(ValueError, match="dims=3"):
        unet_from_params(dict(TINY_UNET, dims=3))
    unet = UNetModel(**TINY_UNET).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([5])
    with pytest.raises(ValueError, match=r"context must be \(B, tokens, 16\).*got \(1, 1, 12\)"):
        unet(x, t, context=torch.randn(1, 1, 12))
    with pytest.raises(ValueError, match=r"U-Net input must be \(B, 4, H, W\); got \(1, 3, 8, 8\)"):
        unet(torch.randn(1, 3, 8, 8), t, context=torch.randn(1, 1, 16))
    with pytest.raises(ValueError, match="multiple of 2"):
        unet(torch.randn(1, 4, 7, 7), t, context=torch.randn(1, 1, 16))
