"""Tiny gateable denoisers for the T-GATE tests: native DiT and three diffusers models.

Each maker returns (model, call) with call(model, rows) -> output tensor, feeding fixed
random inputs: rows = 2 is the CFG batch [cond; uncond], rows = 1 the unconditional
branch alone (what the reference runs after the gate).
"""
import torch

from conftest import randomize


def _inputs(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def native_dit(seed=0, depth=2, hidden_size=32, num_heads=2):
    from dit import DiT

    model = randomize(DiT(input_size=8, patch_size=2, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                          num_classes=10), seed=seed, std=0.05).eval()
    (x,) = _inputs(100, (1, 4, 8, 8))
    t, y = torch.tensor([500.0]), torch.tensor([3, 10])  # 10: the null class

    def call(m, rows, x_step=None):
        xs = (x if x_step is None else x_step)
        return m(xs.expand(rows, -1, -1, -1).contiguous(), t.expand(rows), y[-rows:])

    return model, call


def unet(seed=0):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4)
    model = randomize(model, seed=seed).eval()
    x, text = _inputs(101, (1, 4, 8, 8), (2, 5, 16))  # text rows: [cond; uncond]
    t = torch.tensor([500.0])

    def call(m, rows, x_step=None):
        xs = (x if x_step is None else x_step)
        return m(xs.expand(rows, -1, -1, -1).contiguous(), t.expand(rows), encoder_hidden_states=text[-rows:]).sample

    return model, call


def pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, caption_channels=16, in_channels=4,
                                     cross_attention_dim=16, out_channels=8)
    model = randomize(model, seed=seed).eval()
    x, text = _inputs(102, (1, 4, 8, 8), (2, 6, 16))
    t = torch.tensor([500.0])
    extra = {"resolution": None, "aspect_ratio": None}

    def call(m, rows, x_step=None):
        xs = (x if x_step is None else x_step)
        return m(xs.expand(rows, -1, -1, -1).contiguous(), encoder_hidden_states=text[-rows:], timestep=t.expand(rows),
                 added_cond_kwargs=extra).sample

    return model, call


def diffusers_dit(seed=0):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    model = randomize(model, seed=seed).eval()
    (x,) = _inputs(103, (1, 4, 8, 8))
    t, y = torch.tensor([500]), torch.tensor([3, 9])

    def call(m, rows, x_step=None):
        xs = (x if x_step is None else x_step)
        return m(xs.expand(rows, -1, -1, -1).contiguous(), timestep=t.expand(rows), class_labels=y[-rows:]).sample

    return model, call


MAKERS = {"native_dit": native_dit, "unet": unet, "pixart": pixart, "diffusers_dit": diffusers_dit}
