"""DeepCache on the native U-Net: plain at interval 1, the DeepCache package's schedule and
branch semantics (its helper driving diffusers' UNet with the same weights), T-GATE resets."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from test_ldm_unet import diffusers_twin

from deep_cache import DeepCacheHook
from deep_cache.hook import UNetFeatureCache
from diffusion import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import NoiseSchedule, build_solver

from ldm_tiny import TINY_UNET_HEAD_CHANNELS, ContextDenoiser, randomized_unet

SD_SCHEDULE = NoiseSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _inputs(seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 3, 16, generator=gen)
    uncond = torch.randn(batch, 3, 16, generator=gen)
    noise = initial_noise(sample_generators(seed, range(batch), "cpu"), (4, 8, 8), "cpu")
    return noise, cond, uncond


def _ours(unet, steps, hooks=(), cfg=3.0):
    noise, cond, uncond = _inputs()
    solver = build_solver("ddim", steps, SD_SCHEDULE, spacing="ldm")
    model = ContextDenoiser(unet)
    for hook in hooks:
        hook.attach([model], ["ldm"], solver)
    try:
        return sample([model], solver, noise, {"context": cond}, {"context": uncond}, cfg_scale=cfg, hooks=hooks,
                      progress=False).latents
    finally:
        for hook in hooks:
            hook.detach()


def _reference(twin, steps, cache_interval, cache_branch_id, cfg=3.0):
    """A plain DDIM + CFG loop over diffusers' UNet with the DeepCache package's helper on it."""
    from DeepCache import DeepCacheSDHelper

    scheduler = DDIMScheduler(num_train_timesteps=1000, trained_betas=SD_SCHEDULE.betas().tolist(), clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=twin, scheduler=scheduler))
    helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
    helper.enable()
    x, cond, uncond = _inputs()
    try:
        for t in scheduler.timesteps:
            out = twin(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.chunk(2)
            x = scheduler.step(out_uncond + cfg * (out_cond - out_uncond), t, x).prev_sample
    finally:
        helper.disable()
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_interval_one_is_the_plain_model_bitwise():
    unet = randomized_unet(TINY_UNET_HEAD_CHANNELS)
    plain = _ours(unet, 5)
    assert torch.equal(_ours(unet, 5, [DeepCacheHook(cache_interval=1, cache_branch_id=0)]), plain)
    assert torch.equal(_ours(unet, 5), plain)  # and the hook left nothing behind
    assert _rel(_ours(unet, 5, [DeepCacheHook(cache_interval=2, cache_branch_id=0)]), plain) > 1e-3  # can fail


@torch.no_grad()
@pytest.mark.parametrize("branch", [0, 1, 3])
def test_matches_the_deepcache_package(branch):
    # two res blocks per level: three input blocks per level, the layout DeepCache's `id // 3, id % 3` assumes
    unet = randomized_unet(TINY_UNET_HEAD_CHANNELS)
    twin = diffusers_twin(unet, TINY_UNET_HEAD_CHANNELS)
    ours = _ours(unet, 8, [DeepCacheHook(cache_interval=3, cache_branch_id=branch)])
    want = _reference(twin, 8, 3, branch)
    assert _rel(ours, want) < 1e-5
    assert _rel(ours, _ours(unet, 8)) > 1e-3  # the cache changed the result: cached steps really ran shallow


@torch.no_grad()
def test_full_steps_follow_the_interval_and_restart_at_the_tgate_gate(monkeypatch):
    from tgate import TGateHook

    shallow_steps = []
    real = UNetFeatureCache._shallow

    def spy(self, unet, x, *args):
        shallow_steps.append(step["i"])
        return real(self, unet, x, *args)

    step = {}
    monkeypatch.setattr(UNetFeatureCache, "_shallow", spy)
    cache = DeepCacheHook(cache_interval=3, cache_branch_id=1)

    class StepSpy:
        def attach(self, *a): pass
        def detach(self): pass
        def start(self, plan): pass
        def step(self, ctx): step["i"] = ctx.i
        def end(self): pass

    unet = randomized_unet(TINY_UNET_HEAD_CHANNELS)
    _ours(unet, 10, [StepSpy(), cache])
    assert shallow_steps == [1, 2, 4, 5, 7, 8]
    shallow_steps.clear()
    # T-GATE first (it sets refresh_features), then DeepCache: full at 0, 3, g-1 = 4, g = 5, 8
    _ours(unet, 10, [StepSpy(), TGateHook(gate_step=5, sp_interval=1, fi_interval=1, warm_up=0), cache])
    assert shallow_steps == [1, 2, 6, 7, 9]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cache_interval=0"):
        DeepCacheHook(cache_interval=0)
    with pytest.raises(ValueError, match="cache_branch_id=-1"):
        DeepCacheHook(cache_branch_id=-1)
    hook = DeepCacheHook(cache_branch_id=99)
    with pytest.raises(ValueError, match="cache_branch_id=99: this U-Net has 6 input blocks, so 0..5 allowed"):
        hook.attach([ContextDenoiser(randomized_unet(TINY_UNET_HEAD_CHANNELS))], ["ldm"], None)
    with pytest.raises(ValueError, match="deep_cache needs a U-Net"):
        DeepCacheHook().attach([torch.nn.Linear(2, 2)], ["linear"], None)
