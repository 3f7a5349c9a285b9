"""T-Stitch on SD3 / SD3.5 and FLUX.1 pipelines (tiny random MM-DiT pipelines, offline): bitwise ends, the
step split over flow-matching steps (shifted, resolution-dependent), img2img, true CFG and skip-layer
guidance passes, three models, refusals (named mismatches, before any weights are read), restore."""
import math

import numpy as np
import pytest
import torch

import tstitch
from tstitch import StitchedDenoiser, stitch_pipeline, unstitch_pipeline

import tiny_mmdit as m

CALL = dict(height=m.IMAGE_SIZE, width=m.IMAGE_SIZE, output_type="np", max_sequence_length=m.MAX_TOKENS)


def _run(pipe, steps=10, seed=0, **kwargs):
    call = {**CALL, **kwargs}
    return pipe(m.PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **call).images


class CallLog:
    """Every call of the real transformers: which one ran, its timestep (on the scheduler's scale), its rows,
    and whether it was a skip-layer guidance pass."""

    def __init__(self, timestep_scale=1.0, **models):
        self.calls = []
        self.handles = [model.register_forward_pre_hook(self._hook(name, timestep_scale), with_kwargs=True)
                        for name, model in models.items()]

    def _hook(self, name, scale):
        def hook(module, args, kwargs):
            t = kwargs["timestep"].reshape(-1)[0].item() * scale
            self.calls.append((name, t, kwargs["hidden_states"].shape[0], kwargs.get("skip_layers") is not None))
        return hook

    def names(self):
        return [c[0] for c in self.calls]

    def timesteps(self, name):
        return [c[1] for c in self.calls if c[0] == name]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sd3_small(seed=7):
    """SD3.5 Medium in miniature: fewer, narrower layers and MMDiT-X dual attention in its first block."""
    return m.sd3_transformer(seed=seed, num_layers=1, head_dim=4, dual_attention_layers=(0,))


def flux_small(seed=7):
    """Flux.1 Lite in miniature: fewer double-stream blocks, the same single-stream ones."""
    return m.flux_transformer(seed=seed, num_layers=1)


FAMILIES = {
    "sd3": (m.sd3_pipeline, sd3_small, 1.0),
    "flux": (m.flux_pipeline, flux_small, 1000.0),  # FluxPipeline hands its transformer timestep / 1000
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fraction_0_is_the_large_pipeline_and_1_the_small_one_bitwise(family):
    make_pipe, make_small, _ = FAMILIES[family]
    small = make_small()
    plain_large = _run(make_pipe(seed=0))
    plain_small = _run(make_pipe(seed=0, transformer=small))
    assert not np.array_equal(plain_large, plain_small)  # the two models do differ
    pipe = stitch_pipeline(make_pipe(seed=0), small, ratio=0.4)
    assert isinstance(pipe.transformer, StitchedDenoiser)
    assert np.array_equal(_run(pipe, ratio=0.0), plain_large)
    assert np.array_equal(_run(pipe, unet_s_ratio=1.0), plain_small)
    mid = _run(pipe)
    assert not np.array_equal(mid, plain_large) and not np.array_equal(mid, plain_small)
    assert pipe.transformer.steps_per_model() == {"small": 4, "large": 6}


def _dynamic_shift_timesteps(n: int, image_size: int) -> list[float]:
    """FLUX.1-dev's schedule, computed here from its published recipe: sigmas linspace(1, 1/n, n) shifted by
    exp(mu) / (exp(mu) + 1/sigma - 1), mu linear in the image's token count (256 -> 0.5, 4096 -> 1.15)."""
    tokens = (image_size // 2 // 2) ** 2  # VAE downsampling 2 (tiny), then 2x2 packing
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    sigmas = np.linspace(1.0, 1.0 / n, n)
    return [1000 * math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sigmas]


@pytest.mark.parametrize("image_size", [16, 32])
def test_flux_split_follows_the_dynamically_shifted_flow_matching_steps(image_size):
    small = flux_small()
    pipe = stitch_pipeline(m.flux_pipeline(seed=0), small, ratio=0.4)
    log = CallLog(timestep_scale=1000.0, small=small, large=pipe.transformer.large)
    _run(pipe, steps=10, height=image_size, width=image_size)
    log.remove()
    expected = _dynamic_shift_timesteps(10, image_size)
    # round(0.4 * 10) = 4 steps on the small model, by step index, whatever the shifted timesteps are
    assert log.names() == ["small"] * 4 + ["large"] * 6
    assert log.timesteps("small") == pytest.approx(expected[:4], abs=1e-2)
    assert log.timesteps("large") == pytest.approx(expected[4:], abs=1e-2)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(expected, abs=1e-2)
    other = _dynamic_shift_timesteps(10, 48 if image_size == 16 else 16)
    assert abs(other[3] - expected[3]) > 1  # the shift depends on the resolution: a third schedule differs


def test_sd3_split_follows_the_shifted_schedule_and_a_dynamic_one():
    small = sd3_small()
    for scheduler in (m.flow_scheduler(), m.flow_scheduler(dynamic=True)):
        pipe = stitch_pipeline(m.sd3_pipeline(seed=0, scheduler=scheduler), small, ratio=0.3)
        log = CallLog(small=small, large=pipe.transformer.large)
        _run(pipe, steps=10)
        log.remove()
        timesteps = pipe.scheduler.timesteps.tolist()
        assert len(timesteps) == 10
        assert log.names() == ["small"] * 3 + ["large"] * 7
        assert log.timesteps("small") == timesteps[:3] and log.timesteps("large") == timesteps[3:]
        assert pipe.transformer.last_steps == tstitch.model_per_step([0.3, 0.7], 10)
        # the shifted timesteps crowd near t = 1000: a split by timestep value (NVlabs' DiT rule, small while
        # t / 1000 >= 1 - r) would give the small model more steps than round(r n) = 3
        assert sum(t / 1000 >= 0.7 for t in timesteps) > 3


def test_sd3_img2img_splits_the_steps_it_runs():
    from diffusers import StableDiffusion3Img2ImgPipeline

    image = torch.rand(1, 3, m.IMAGE_SIZE, m.IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    kwargs = dict(image=image, strength=0.5)
    plain = _run(m.sd3_pipeline(seed=0, cls=StableDiffusion3Img2ImgPipeline), **kwargs)
    small = sd3_small()
    pipe = stitch_pipeline(m.sd3_pipeline(seed=0, cls=StableDiffusion3Img2ImgPipeline), small, ratio=0.4)
    log = CallLog(small=small, large=pipe.transformer.large)
    stitched = _run(pipe, **kwargs)
    log.remove()
    # strength 0.5 of 10 steps runs the last 5 (the pipeline sets the scheduler's begin index); round(0.4 * 5) = 2
    assert log.names() == ["small"] * 2 + ["large"] * 3
    assert log.timesteps("small") == pipe.scheduler.timesteps[5:7].tolist()
    assert not np.array_equal(stitched, plain)
    assert np.array_equal(_run(pipe, ratio=0.0, **kwargs), plain)


def test_flux_true_cfg_calls_the_same_steps_model_twice():
    small = flux_small()
    pipe = stitch_pipeline(m.flux_pipeline(seed=0), small, ratio=0.5)
    log = CallLog(timestep_scale=1000.0, small=small, large=pipe.transformer.large)
    _run(pipe, steps=4, negative_prompt="blurry", true_cfg_scale=2.0)
    log.remove()
    # true CFG: a conditional and a negative call per step (two calls, not a batch), both on that step's model
    assert log.names() == ["small"] * 4 + ["large"] * 4
    assert [c[2] for c in log.calls] == [1] * 8
    assert pipe.transformer.last_calls == [(0, 0), (0, 0), (1, 0), (1, 0), (2, 1), (2, 1), (3, 1), (3, 1)]


def test_sd3_skip_layer_guidance_pass_runs_on_its_steps_model():
    small = sd3_small()
    pipe = stitch_pipeline(m.sd3_pipeline(seed=0), small, ratio=0.2)
    log = CallLog(small=small, large=pipe.transformer.large)
    # skip-layer guidance at steps i with 0.01 * 10 < i < 0.5 * 10: 1, 2, 3, 4 (an extra conditional pass each)
    _run(pipe, steps=10, skip_guidance_layers=[0], skip_layer_guidance_stop=0.5)
    log.remove()
    steps = pipe.transformer.last_calls
    assert [s for s, _ in steps] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9]
    assert [(name, rows, slg) for name, _, rows, slg in log.calls[:5]] == [
        ("small", 2, False), ("small", 2, False), ("small", 1, True), ("large", 2, False), ("large", 1, True)]
    assert pipe.transformer.last_steps == [0, 0] + [1] * 8


def test_three_models_with_fractions():
    small, middle = sd3_small(seed=7), m.sd3_transformer(seed=8, num_layers=1, head_dim=8)
    pipe = stitch_pipeline(m.sd3_pipeline(seed=0), [small, middle], fractions=[0.4, 0.2, 0.4])
    log = CallLog(small=small, middle=middle, large=pipe.transformer.large)
    out = _run(pipe)
    log.remove()
    assert log.names() == ["small"] * 4 + ["middle"] * 2 + ["large"] * 4
    assert pipe.transformer.last_steps == [0] * 4 + [1] * 2 + [2] * 4
    two = stitch_pipeline(m.sd3_pipeline(seed=0), sd3_small(seed=7), ratio=0.4)
    assert not np.array_equal(out, _run(two))  # the middle model's 2 steps change the image
    with pytest.raises(ValueError, match="two-model shorthand"):
        _run(pipe, ratio=0.5)


@pytest.mark.parametrize("family, small, message", [
    ("sd3", lambda: __import__("tiny_sd").sdxl_unet(seed=1),
     r"different denoiser classes: small is UNet2DConditionModel, large is SD3Transformer2DModel "
     r"\(their inputs differ too: in_channels=4 vs 16, out_channels=4 vs 16\)"),
    ("flux", lambda: m.sd3_transformer(seed=1),
     r"small is SD3Transformer2DModel, large is FluxTransformer2DModel \(their inputs differ too: in_channels=16 vs "
     r"64, joint_attention_dim=64 vs 32, pooled_projection_dim=64 vs 32\)"),
    ("sd3", lambda: m.flux_transformer(seed=1), r"small is FluxTransformer2DModel, large is SD3Transformer2DModel"),
    ("sd3", lambda: m.sd3_transformer(seed=1, joint_attention_dim=32),
     r"joint-attention text-context widths \(joint_attention_dim\): small has joint_attention_dim=32, "
     r"large has joint_attention_dim=64"),
    ("sd3", lambda: m.sd3_transformer(seed=1, pooled_projection_dim=32),
     r"pooled text-embedding widths \(pooled_projection_dim\): small has pooled_projection_dim=32, "
     r"large has pooled_projection_dim=64"),
    ("sd3", lambda: m.sd3_transformer(seed=1, in_channels=4, out_channels=4),
     r"latent channels: small has in_channels=4, large has in_channels=16"),
    ("flux", lambda: m.flux_transformer(seed=1, guidance_embeds=False),
     r"guidance inputs \(guidance_embeds.*\): small has guidance_embeds=False, large has guidance_embeds=True"),
    ("flux", lambda: m.flux_transformer(seed=1, pooled_projection_dim=16),
     r"small has pooled_projection_dim=16, large has pooled_projection_dim=32"),
])
def test_models_that_cannot_stitch_are_refused_naming_what_differs(family, small, message):
    pipe = FAMILIES[family][0](seed=0)
    cls = type(pipe)
    with pytest.raises(ValueError, match=message):
        stitch_pipeline(pipe, small(), ratio=0.4)
    assert not tstitch.is_stitched(pipe) and type(pipe) is cls


def test_a_saved_sdxl_pipeline_is_refused_before_its_weights_are_read(tmp_path):
    import tiny_sd

    folder = tmp_path / "sdxl"
    tiny_sd.sdxl_pipeline(seed=0).save_pretrained(folder)
    for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()  # only unet/config.json is left: the refusal must come from the config alone
    message = (r"cannot stitch .*sdxl into .*: different denoiser classes: .*sdxl is UNet2DConditionModel, .* is "
               r"SD3Transformer2DModel \(their inputs differ too: in_channels=4 vs 16")
    with pytest.raises(ValueError, match=message):
        stitch_pipeline(m.sd3_pipeline(seed=0), str(folder), ratio=0.4)
    # a saved SD3 pipeline folder of the same family loads (its transformer/) and stitches
    small_dir = tmp_path / "sd3_small"
    small = sd3_small()
    m.sd3_pipeline(seed=0, transformer=small).save_pretrained(small_dir)
    pipe = stitch_pipeline(m.sd3_pipeline(seed=0), str(small_dir), ratio=1.0)
    out = _run(pipe)
    assert np.array_equal(out, _run(m.sd3_pipeline(seed=0, transformer=small)))
    assert not np.array_equal(out, _run(m.sd3_pipeline(seed=0)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unstitch_restores_the_pipeline_bitwise(family):
    make_pipe, make_small, _ = FAMILIES[family]
    pipe = make_pipe(seed=0)
    transformer, cls = pipe.transformer, type(pipe)
    before = _run(pipe)
    stitch_pipeline(pipe, make_small(), ratio=0.5)
    stitched = _run(pipe)
    assert not np.array_equal(stitched, before)
    assert pipe.transformer.config is transformer.config and pipe.dtype == torch.float32
    unstitch_pipeline(pipe)
    assert pipe.transformer is transformer and type(pipe) is cls and "step" not in vars(pipe.scheduler)
    assert np.array_equal(_run(pipe), before)
