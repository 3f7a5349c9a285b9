"""T-GATE on the native LDM U-Net gates the same attention as on diffusers' UNet (whose gating
tests/test_tgate_hooks.py checks against the tgate package): same weights, same results."""
import pytest
import torch
from test_ldm_unet import diffusers_twin

from diffusion import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import NoiseSchedule, build_solver
from tgate import TGateHook

from ldm_tiny import TINY_UNET_HEAD_CHANNELS, ContextDenoiser, randomized_unet

LDM_SCHEDULE = NoiseSchedule(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")


def _run(unet, hooks, steps=10):
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    noise = initial_noise(sample_generators(0, range(2), "cpu"), (4, 8, 8), "cpu")
    solver = build_solver("ddim", steps, LDM_SCHEDULE, spacing="ldm")
    model = ContextDenoiser(unet)
    for hook in hooks:
        hook.attach([model], ["unet"], solver)
    try:
        return sample([model], solver, noise, {"context": cond}, {"context": uncond}, cfg_scale=3.0, hooks=hooks,
                      progress=False).latents
    finally:
        for hook in hooks:
            hook.detach()


@torch.no_grad()
@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_gated_native_unet_equals_gated_diffusers_unet(branch):
    native = randomized_unet(TINY_UNET_HEAD_CHANNELS)
    twin = diffusers_twin(native, TINY_UNET_HEAD_CHANNELS)

    def gate():
        return TGateHook(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1, branch=branch)

    ours, theirs = _run(native, [gate()]), _run(twin, [gate()])
    plain = _run(native, [])
    parity = ((ours - theirs).norm() / theirs.norm()).item()
    effect = ((ours - plain).norm() / plain.norm()).item()
    assert parity < 1e-5
    assert effect > max(1e-5, 50 * parity)  # gating acted, far beyond the float difference of the twins
