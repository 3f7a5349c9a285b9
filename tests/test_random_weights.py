"""pretrained=false: random weights whose output depends on the input, the timestep, the class and every block."""
from __future__ import annotations

import torch

from diffusion.random_weights import fill_zero_init_layers
from dit import build_dit
from runs.run import build_denoiser, model_configs


def _dit_s2(compose_sample):
    cfg = compose_sample("model=dit_s2")
    torch.manual_seed(0)
    return build_denoiser(cfg.model, 8, pretrained=False, device="cpu")


def test_fresh_dit_is_zero_but_random_weights_are_not():
    """The model's own init (adaLN-Zero) outputs exactly zero: the reason for the fill."""
    torch.manual_seed(0)
    model = build_dit("DiT-S/2", input_size=8, num_classes=10).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        assert model(x, t, y).abs().max() == 0
        filled = fill_zero_init_layers(model)
        out = model(x, t, y)
    assert filled == [f"blocks.{i}.adaLN_modulation.1" for i in range(12)] + [
        "final_layer.linear", "final_layer.adaLN_modulation.1"]
    assert 0.3 < out.pow(2).mean().sqrt() < 3  # O(1), like a noise prediction


def test_pretrained_false_output_depends_on_class_timestep_input_and_every_block(compose_sample):
    model = _dit_s2(compose_sample)
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 400]), torch.tensor([1, 2])

    def rel_change(out):
        return ((out - base).norm() / base.norm()).item()

    with torch.no_grad():
        base = model(x, t, y)
        assert base.abs().max() > 0
        assert rel_change(model(x, t, torch.tensor([3, 4]))) > 1e-2        # class
        assert rel_change(model(x, torch.tensor([10, 20]), y)) > 1e-2      # timestep
        assert rel_change(model(x.flip(-1), t, y)) > 1e-2                  # input
        blocks = model.blocks
        for skipped in range(len(blocks)):
            model.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != skipped])
            assert rel_change(model(x, t, y)) > 1e-3, f"block {skipped} is an identity"
        model.blocks = blocks
        assert torch.equal(model(x, t, y), base)


def test_two_models_of_one_architecture_in_one_run_differ(compose_sample):
    """One stream from the seed, models built one after another: DiT-S/2 stitched with DiT-S/2 are two models."""
    cfg = compose_sample("+exp=dit_stitch_0.4", "model=dit_s2", "+model@family.stitch.small=dit_s2")
    torch.manual_seed(0)
    small, large = (build_denoiser(c, 8, pretrained=False, device="cpu") for c in model_configs(cfg))
    torch.manual_seed(0)
    again = [build_denoiser(c, 8, pretrained=False, device="cpu") for c in model_configs(cfg)][0]
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([3])
    with torch.no_grad():
        a, b = small(x, t, y), large(x, t, y)
        assert torch.equal(again(x, t, y), a)  # the seed decides the weights
    assert not torch.allclose(a, b, rtol=1e-2, atol=0)


def test_training_keeps_the_models_own_zero_init(compose_sample):
    cfg = compose_sample("model=dit_s2")
    model = build_denoiser(cfg.model, 8, pretrained=False, device="cpu", keep_zero_init=True)
    assert model.final_layer.linear.weight.abs().max() == 0
    assert all(b.adaLN_modulation[-1].weight.abs().max() == 0 for b in model.blocks)


def test_meta_models_are_left_alone():
    with torch.device("meta"):
        model = build_dit("DiT-S/2", input_size=8)
    assert fill_zero_init_layers(model) == []


def test_a_random_unet_already_has_non_zero_outputs(compose_sample):
    """Our LDM U-Net keeps PyTorch's default init (CompVis zeroes output convs only for training):
    nothing to fill, and its output is not zero."""
    cfg = compose_sample("model=ldm_s_cin256")
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, 8, pretrained=False, device="cpu")
    assert fill_zero_init_layers(model) == []
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), torch.tensor([500]), y=torch.tensor([1]))
    assert out.abs().max() > 0
