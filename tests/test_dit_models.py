"""dit.models: registry, official state-dict layout, and parity with a plain reading of the official maths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.attention import find_attention
from dit.models import DiT, DiT_models, dit_config

from conftest import randomize

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


# ---------------------------------------------------------------------------
# Independent reading of the official DiT maths (float64, explicit ops)
# ---------------------------------------------------------------------------

def ref_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos table in numpy float64, as the official functions compute it."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def ref_layernorm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_linear(sd, prefix, x):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def ref_forward(sd, x, t, y, *, patch_size, num_heads, out_channels):
    """Official DiT forward from a state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, p = x.shape[0], patch_size
    hidden = sd["x_embedder.proj.weight"].shape[0]

    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2)                       # (N, T, D)
    grid = x.shape[-1] // p
    tokens = tokens + torch.from_numpy(ref_pos_embed(hidden, grid)).float().double()[None]

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1).double()
    t_emb = ref_linear(sd, "t_embedder.mlp.2", F.silu(ref_linear(sd, "t_embedder.mlp.0", t_freq)))
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]           # (N, D)

    def mod(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = hidden // num_heads
    for i in range(depth):
        b = f"blocks.{i}."
        chunks = ref_linear(sd, b + "adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
        h = mod(ref_layernorm(tokens), shift_msa, scale_msa)
        qkv = ref_linear(sd, b + "attn.qkv", h).reshape(n, -1, 3, num_heads, head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))   # (N, heads, T, hd)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(n, -1, hidden)
        tokens = tokens + gate_msa[:, None] * ref_linear(sd, b + "attn.proj", a)
        h = mod(ref_layernorm(tokens), shift_mlp, scale_mlp)
        h = ref_linear(sd, b + "mlp.fc2", ref_gelu_tanh(ref_linear(sd, b + "mlp.fc1", h)))
        tokens = tokens + gate_mlp[:, None] * h

    shift, scale = ref_linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = ref_linear(sd, "final_layer.linear", mod(ref_layernorm(tokens), shift, scale))  # (N, T, p*p*C)
    # token (row, col) holds a p x p patch laid out as (pp, qq, channel).
    out = out.reshape(n, grid, grid, p, p, out_channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, out_channels, grid * p, grid * p)


def official_keys(depth, hidden, in_ch, patch, tokens, num_rows, out_ch, mlp_hidden):
    """Every key and shape of the official DiT state dict, as its models.py defines them."""
    d = hidden
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, in_ch, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_rows, d),
        "final_layer.linear.weight": (patch * patch * out_ch, d),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (mlp_hidden, d),
            b + "mlp.fc1.bias": (mlp_hidden,),
            b + "mlp.fc2.weight": (d, mlp_hidden),
            b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d),
            b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------
# Registry and sizes
# ---------------------------------------------------------------------------

PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("name", list(DiT_models))
def test_registry_builds_on_meta_with_paper_param_count(name):
    with torch.device("meta"):
        model = DiT_models[name]()
    count = sum(p.numel() for p in model.parameters())
    size = name.removeprefix("DiT-").split("/")[0]
    assert abs(count - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01, (name, count)
    cfg = dit_config(name)
    assert len(model.blocks) == cfg["depth"] and model.patch_size == cfg["patch_size"]


def test_xl2_param_count_matches_official_exactly():
    # 675,129,632 is what the official train.py logs for DiT-XL/2 (pos_embed included).
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_registry_names_and_unknown_name():
    sizes, patches = ["XL", "L", "B", "S"], [2, 4, 8]
    assert list(DiT_models) == [f"DiT-{s}/{p}" for s in sizes for p in patches]
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_config("DiT-XXL/2")


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/8"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_small_real_builds_forward_shapes(name, learn_sigma):
    model = DiT_models[name](input_size=16, num_classes=10, learn_sigma=learn_sigma).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]), torch.tensor([3, 10]))  # 10 = null class
    assert out.shape == (2, 8 if learn_sigma else 4, 16, 16)


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma,dropout", [(True, 0.1), (False, 0.0)])
def test_state_dict_layout_is_official(learn_sigma, dropout):
    model = DiT(**TINY, learn_sigma=learn_sigma, class_dropout_prob=dropout)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_keys(
        depth=2, hidden=64, in_ch=4, patch=2, tokens=16,
        num_rows=10 + (dropout > 0), out_ch=8 if learn_sigma else 4, mlp_hidden=256,
    )
    assert got == want
    assert not model.pos_embed.requires_grad


def test_pos_embed_matches_numpy_official():
    model = DiT(**TINY)
    want = torch.from_numpy(ref_pos_embed(64, 4)).float()[None]
    torch.testing.assert_close(model.pos_embed.data, want, rtol=0, atol=1e-7)


def test_official_init_zeroes_adaln_and_output():
    model = DiT(**TINY)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model.eval()(x, torch.tensor([5, 6]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0  # final linear is zero at init
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0


# ---------------------------------------------------------------------------
# Parity with the reference maths
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_matches_reference(learn_sigma):
    model = randomize(DiT(**TINY, learn_sigma=learn_sigma)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0.0, 17.5, 999.0])
    y = torch.tensor([0, 9, 10])
    with torch.no_grad():
        got = model(x, t, y)
    want = ref_forward(model.state_dict(), x, t, y, patch_size=2, num_heads=4, out_channels=model.out_channels)
    assert got.shape == want.shape == (3, model.out_channels, 8, 8)
    assert rel_err(got, want) < 1e-5


def test_registry_model_matches_reference():
    model = randomize(DiT_models["DiT-S/4"](input_size=8, num_classes=10), std=0.05).eval()
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 500]), torch.tensor([4, 10])
    with torch.no_grad():
        got = model(x, t, y)
    want = ref_forward(model.state_dict(), x, t, y, patch_size=4, num_heads=6, out_channels=8)
    assert rel_err(got, want) < 1e-5


def test_attention_uses_sdpa_and_is_marked(monkeypatch):
    model = randomize(DiT(**TINY)).eval()
    marked = list(find_attention(model))
    assert [n for n, _ in marked] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(m.is_cross_attention is False for _, m in marked)

    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert calls == [(2, 4, 16, 16)] * 2  # (N, heads, T, head_dim) per block


def test_label_dropout_only_in_training_or_forced():
    model = DiT(**TINY, class_dropout_prob=1.0)
    labels = torch.tensor([1, 2, 3])
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(model.y_embedder(labels, train=False), table[labels])
    assert torch.equal(model.y_embedder(labels, train=True), table[[10, 10, 10]])  # p=1 drops all
    forced = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    assert torch.equal(forced, table[[1, 10, 3]])


def test_scalar_timestep_broadcasts():
    model = randomize(DiT(**TINY)).eval()
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        scalar = model(x, torch.tensor(7), y)
        torch.testing.assert_close(scalar, model(x, torch.tensor([7, 7]), y))
        assert not torch.allclose(scalar, model(x, torch.tensor([8, 8]), y))  # the timestep is not ignored


# ---------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------

def _cfg_setup():
    model = randomize(DiT(**TINY)).eval()
    gen = torch.Generator().manual_seed(2)
    half = torch.randn(2, 4, 8, 8, generator=gen)
    x = torch.cat([half, torch.randn(2, 4, 8, 8, generator=gen)])  # second half must be ignored
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([3, 4, 10, 10])
    with torch.no_grad():
        raw = model(torch.cat([half, half]), t, y)
    return model, x, t, y, raw


@pytest.mark.parametrize("guided", [3, None])
def test_forward_with_cfg_semantics(guided):
    model, x, t, y, raw = _cfg_setup()
    scale = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, scale, guided_channels=guided)
    g = 3 if guided == 3 else 4
    cond, uncond = raw[:2], raw[2:]
    guided_eps = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    assert out.shape == raw.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out[:2, :g], guided_eps)
    torch.testing.assert_close(out[2:, :g], guided_eps)
    # Everything else: each row's own unguided output (official `rest`).
    torch.testing.assert_close(out[:2, g:], cond[:, g:])
    torch.testing.assert_close(out[2:, g:], uncond[:, g:])


def test_forward_with_cfg_default_is_official_three_channels():
    model, x, t, y, raw = _cfg_setup()
    with torch.no_grad():
        default = model.forward_with_cfg(x, t, y, 4.0)
        all_ch = model.forward_with_cfg(x, t, y, 4.0, guided_channels=None)
    torch.testing.assert_close(default[:, :3], all_ch[:, :3])
    assert not torch.allclose(default[:, 3], all_ch[:, 3])  # 4th eps channel left unguided
    # scale 1 is plain conditional eps on the guided channels.
    with torch.no_grad():
        one = model.forward_with_cfg(x, t, y, 1.0, guided_channels=None)
    torch.testing.assert_close(one[:2], raw[:2])


def test_half_precision_model_runs():
    # timestep features are built in float32 and cast to the model's dtype (as for GPU sampling in bf16).
    model = randomize(DiT(**TINY)).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 900]), torch.tensor([1, 10]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dit_config_values():
    assert dit_config("DiT-XL/2") == {"depth": 28, "hidden_size": 1152, "patch_size": 2, "num_heads": 16}
    assert dit_config("DiT-L/4") == {"depth": 24, "hidden_size": 1024, "patch_size": 4, "num_heads": 16}
    assert dit_config("DiT-B/8") == {"depth": 12, "hidden_size": 768, "patch_size": 8, "num_heads": 12}
    assert dit_config("DiT-S/2") == {"depth": 12, "hidden_size": 384, "patch_size": 2, "num_heads": 6}
