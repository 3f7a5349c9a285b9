"""Tiny LDM U-Nets in CompVis config form (GroupNorm needs widths that are multiples of 32)."""
import torch

from ldm import UNetModel

# a CompVis unet_config.params as a cin LDM has them (spatial transformer, num_heads form)
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                 num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=16)
# the T-Stitch pair's form: num_head_channels instead of num_heads, two res blocks per level
TINY_UNET_HEAD_CHANNELS = dict(TINY_UNET, num_heads=-1, num_head_channels=16, num_res_blocks=2)
TINY_COND_STAGE = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                   "params": {"embed_dim": 16, "n_classes": 11, "key": "class_label"}}


def randomized_unet(params=TINY_UNET, seed=0, std=0.1) -> UNetModel:
    """Every parameter random and non-zero (CompVis zero-initialises output convs, which would hide errors)."""
    model = UNetModel(**params).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


class ContextDenoiser(torch.nn.Module):
    """model(x, t, context) for the sampler, around a U-Net taking a text-like context: the
    native one (`context=`) or diffusers' UNet2DConditionModel (`encoder_hidden_states=`)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        if isinstance(self.unet, UNetModel):
            return self.unet(x, t, context=context)
        return self.unet(x, t, encoder_hidden_states=context).sample
