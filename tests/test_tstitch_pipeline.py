"""T-Stitch on stock diffusers pipelines (tiny random pipelines, offline): bitwise ends,
the step split (counted on the real models), img2img, Heun, ControlNet, LCM, refusals, restore."""
import pytest
import torch

import tstitch
from tstitch import StitchedDenoiser, get_tstitch_pipeline, get_tstitch_pipepline, stitch_pipeline, unstitch_pipeline

import tiny_sd as t

CALL = dict(height=t.IMAGE_SIZE, width=t.IMAGE_SIZE, output_type="np")


def _run(pipe, steps=10, seed=0, **kwargs):
    return pipe(t.PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **CALL,
                **kwargs).images


class CallLog:
    """Which model ran each denoiser call, seen from forward hooks on the real models."""

    def __init__(self, **models):
        self.calls = []
        self.kwargs = []
        self.handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, m in models.items()]

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.calls.append(name)
            self.kwargs.append(kwargs)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def small_unet():
    return t.sd_unet(seed=7, widths=(8, 16))


def test_ratio_0_is_the_large_pipeline_and_ratio_1_the_small_one_bitwise(small_unet):
    large = t.sd_pipeline(seed=0)
    plain_large = _run(large)
    plain_small = _run(t.sd_pipeline(seed=0, unet=small_unet))
    assert not (plain_large == plain_small).all()
    stitch_pipeline(large, small_unet, ratio=0.5)
    assert (_run(large, unet_s_ratio=0.0) == plain_large).all()
    assert (_run(large, ratio=1.0) == plain_small).all()
    mid = _run(large)
    assert not (mid == plain_large).all() and not (mid == plain_small).all()


@pytest.mark.parametrize("ratio, expected", [(0.3, [0] * 3 + [1] * 7), (0.44, [0] * 4 + [1] * 6),
                                             (0.46, [0] * 5 + [1] * 5), (0.0, [1] * 10), (1.0, [0] * 10)])
def test_mid_ratio_switches_at_the_step_the_native_rule_gives(small_unet, ratio, expected):
    pipe = stitch_pipeline(t.sd_pipeline(seed=0), small_unet, ratio=0.5)
    log = CallLog(small=small_unet, large=pipe.unet.large)
    steps = []
    _run(pipe, ratio=ratio, callback_on_step_end=lambda p, i, ts, kw: steps.append(len(log.calls)) or {})
    log.remove()
    per_step = [log.calls[a:b] for a, b in zip([0] + steps[:-1], steps, strict=True)]  # the calls of each step
    assert per_step == [["small" if j == 0 else "large"] for j in expected]
    assert expected == tstitch.model_per_step([ratio, 1 - ratio], 10)
    assert pipe.unet.last_steps == expected
    assert pipe.unet.steps_per_model() == {"small": expected.count(0), "large": expected.count(1)}


def test_heun_calls_the_model_twice_per_step_and_both_calls_use_that_steps_model(small_unet):
    pipe = stitch_pipeline(t.sd_pipeline(seed=0, scheduler_name="heun"), small_unet, ratio=0.5)
    log = CallLog(small=small_unet, large=pipe.unet.large)
    _run(pipe, steps=4)
    log.remove()
    # 4 Heun steps = 7 model calls (the last step has no correction); steps 0, 1 small, 2, 3 large
    assert pipe.scheduler.order == 2 and len(log.calls) == 7
    assert log.calls == ["small"] * 4 + ["large"] * 3
    assert pipe.unet.last_calls == [(0, 0), (0, 0), (1, 0), (1, 0), (2, 1), (2, 1), (3, 1)]


def test_img2img_with_strength_below_1_splits_the_steps_it_runs(small_unet):
    from diffusers import StableDiffusionImg2ImgPipeline

    image = t.control_image(seed=3)
    kwargs = dict(image=image, strength=0.5)
    plain = _run(t.sd_pipeline(seed=0, cls=StableDiffusionImg2ImgPipeline), **kwargs)
    pipe = stitch_pipeline(t.sd_pipeline(seed=0, cls=StableDiffusionImg2ImgPipeline), small_unet, ratio=0.4)
    log = CallLog(small=small_unet, large=pipe.unet.large)
    stitched = _run(pipe, **kwargs)
    log.remove()
    # strength 0.5 of 10 steps runs 5; the small model runs round(0.4 * 5) = 2 of them
    assert log.calls == ["small"] * 2 + ["large"] * 3
    assert not (stitched == plain).all()
    assert (_run(pipe, ratio=0.0, **kwargs) == plain).all()


def test_controlnet_residuals_reach_whichever_model_runs():
    # a small UNet with the large one's block widths (the ControlNet's residuals fit both), other weights and heads
    small = t.sd_unet(seed=9, attention_head_dim=8)
    kwargs = dict(image=t.control_image(seed=1), steps=4)
    plain = _run(t.sd_controlnet_pipeline(seed=0), **kwargs)
    plain_small = _run(t.sd_controlnet_pipeline(seed=0, unet=small), **kwargs)
    pipe = stitch_pipeline(t.sd_controlnet_pipeline(seed=0), small, ratio=0.5)
    log = CallLog(small=small, large=pipe.unet.large)
    mid = _run(pipe, **kwargs)
    log.remove()
    assert log.calls == ["small"] * 2 + ["large"] * 2
    residuals = [kw.get("down_block_additional_residuals") for kw in log.kwargs]
    # conv_in, block 0's resnet and downsampler, block 1's resnet: 4 down residuals per call
    assert all(r is not None and [x.shape[1] for x in r] == [16, 16, 16, 32] for r in residuals)
    assert all(kw.get("mid_block_additional_residual") is not None for kw in log.kwargs)
    assert (_run(pipe, ratio=0.0, **kwargs) == plain).all()
    assert (_run(pipe, ratio=1.0, **kwargs) == plain_small).all()
    assert not (mid == plain).all()


def test_sdxl_from_saved_folders_with_the_original_spelling(tmp_path):
    large_dir, small_dir = tmp_path / "sdxl", tmp_path / "small"
    t.sdxl_pipeline(seed=0).save_pretrained(large_dir)
    small_unet = t.sdxl_unet(seed=4, widths=(8, 16), transformer_layers_per_block=(1, 1))
    t.sdxl_pipeline(seed=0, unet=small_unet).save_pretrained(small_dir)  # a whole pipeline folder: its unet/ is used
    plain_small = _run(t.sdxl_pipeline(seed=0, unet=small_unet), steps=4)
    plain_large = _run(t.sdxl_pipeline(seed=0), steps=4)
    pipe = get_tstitch_pipepline(str(large_dir), str(small_dir), ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    assert get_tstitch_pipepline is get_tstitch_pipeline
    assert type(pipe).__name__ == "TStitchStableDiffusionXLPipeline"
    assert (_run(pipe, steps=4, unet_s_ratio=1.0) == plain_small).all()
    assert (_run(pipe, steps=4, unet_s_ratio=0.0) == plain_large).all()
    log = CallLog(small=pipe.unet.models[0], large=pipe.unet.large)
    _run(pipe, steps=4)
    log.remove()
    assert log.calls == ["small"] * 2 + ["large"] * 2


def test_lcm_unet_with_an_lcm_lora_style_small_model():
    # large: a distilled LCM UNet (guidance embedding, time_cond_proj_dim); small: none (an LCM-LoRA model)
    large_unet = t.sd_unet(seed=0, time_cond_proj_dim=32)
    small = t.sd_unet(seed=3, widths=(8, 16))
    kwargs = dict(steps=4, guidance_scale=1.0)
    plain_small = _run(t.sd_pipeline(seed=0, scheduler_name="lcm", unet=small), **kwargs)
    pipe = stitch_pipeline(t.sd_pipeline(seed=0, scheduler_name="lcm", unet=large_unet), small, ratio=0.5)
    log = CallLog(small=small, large=large_unet)
    _run(pipe, **kwargs)
    log.remove()
    assert log.calls == ["small", "small", "large", "large"]
    assert [kw.get("timestep_cond") is None for kw in log.kwargs] == [True, True, False, False]
    assert (_run(pipe, ratio=1.0, **kwargs) == plain_small).all()


def test_pixart_transformer_is_stitched_in_place_of_pipe_transformer():
    small = t.pixart_transformer(seed=3, num_layers=1)
    kwargs = dict(steps=4, use_resolution_binning=False, clean_caption=False, max_sequence_length=8)
    plain_small = _run(t.pixart_pipeline(seed=0, transformer=small), **kwargs)
    plain_large = _run(t.pixart_pipeline(seed=0), **kwargs)
    pipe = stitch_pipeline(t.pixart_pipeline(seed=0), small, ratio=0.5)
    assert isinstance(pipe.transformer, StitchedDenoiser)
    assert (_run(pipe, ratio=1.0, **kwargs) == plain_small).all()
    assert (_run(pipe, ratio=0.0, **kwargs) == plain_large).all()
    log = CallLog(small=small, large=pipe.transformer.large)
    _run(pipe, **kwargs)
    log.remove()
    assert log.calls == ["small"] * 2 + ["large"] * 2
    with pytest.raises(ValueError, match=r"caption \(text embedding\) widths: small has caption_channels=32, "
                                         r"large has caption_channels=16"):
        stitch_pipeline(t.pixart_pipeline(seed=0), t.pixart_transformer(seed=1, caption_channels=32))


@pytest.mark.parametrize("small, message", [
    (lambda: t.sd_unet(seed=1, in_channels=8), r"latent channels: small has in_channels=8, large has in_channels=4"),
    (lambda: t.sd_unet(seed=1, cross_attention_dim=16),
     r"cross-attention widths .*: small has cross_attention_dim=16, large has cross_attention_dim=32"),
    (lambda: t.sd_unet(seed=1, sample_size=16), r"sample sizes .*: small has sample_size=16, large has sample_size=8"),
    (lambda: t.sd_unet(seed=1, time_cond_proj_dim=16),
     r"guidance-embedding widths: small has time_cond_proj_dim=16, large has time_cond_proj_dim=32"),
])
def test_incompatible_sd_pairs_are_refused_naming_both_values(small, message):
    pipe = t.sd_pipeline(seed=0, unet=t.sd_unet(seed=0, time_cond_proj_dim=32))
    with pytest.raises(ValueError, match=message):
        stitch_pipeline(pipe, small(), ratio=0.5)
    assert not tstitch.is_stitched(pipe) and type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("small, message", [
    (lambda: t.sd_unet(seed=1, cross_attention_dim=64),
     r"added-conditioning types .*: small has addition_embed_type=None, large has addition_embed_type='text_time'"),
    (lambda: t.sdxl_unet(seed=1, projection_class_embeddings_input_dim=88),
     r"added-conditioning widths .*: small has projection_class_embeddings_input_dim=88, "
     r"large has projection_class_embeddings_input_dim=80"),
    (lambda: t.sdxl_unet(seed=1, addition_time_embed_dim=4, projection_class_embeddings_input_dim=80),
     r"added time-id embedding widths .*: small has addition_time_embed_dim=4, large has addition_time_embed_dim=8"),
])
def test_incompatible_sdxl_pairs_are_refused_naming_both_values(small, message):
    with pytest.raises(ValueError, match=message):
        stitch_pipeline(t.sdxl_pipeline(seed=0), small(), ratio=0.5)


def test_controlnet_refuses_a_small_model_its_residuals_do_not_fit():
    with pytest.raises(ValueError, match=r"under a ControlNet.*small takes \(down, mid\) residual channels "
                                         r"\(\[8, 8, 8, 16\], 16\), large \(\[16, 16, 16, 32\], 32\)"):
        stitch_pipeline(t.sd_controlnet_pipeline(seed=0), t.sd_unet(seed=1, widths=(8, 16)), ratio=0.5)


def test_a_different_denoiser_class_is_refused():
    from diffusers import PixArtTransformer2DModel

    other = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                     out_channels=8)
    with pytest.raises(ValueError, match=r"small is PixArtTransformer2DModel, large is UNet2DConditionModel"):
        stitch_pipeline(t.sd_pipeline(seed=0), other, ratio=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.5}, r"ratio=1.5: the small model's fraction must be a number in \[0, 1\]"),
    ({"unet_s_ratio": 0.2, "ratio": 0.3}, r"unet_s_ratio=0.2 and ratio=0.3: give one"),
    ({"fractions": [0.5, 0.6]}, r"sum to 1.1"),
])
def test_bad_per_call_ratios_fail_before_sampling(small_unet, kwargs, message):
    pipe = stitch_pipeline(t.sd_pipeline(seed=0), small_unet, ratio=0.5)
    with pytest.raises(ValueError, match=message):
        _run(pipe, **kwargs)
    assert "step" not in vars(pipe.scheduler)  # nothing left patched by the failed call


def test_unstitch_restores_the_pipeline_bitwise(small_unet):
    pipe = t.sd_pipeline(seed=0)
    unet, cls = pipe.unet, type(pipe)
    before = _run(pipe)
    stitch_pipeline(pipe, small_unet, ratio=0.5)
    assert isinstance(pipe.unet, StitchedDenoiser) and pipe.unet.config is unet.config
    assert pipe.to("cpu") is pipe and pipe.dtype == torch.float32 and pipe.unet.conv_in is unet.conv_in
    _run(pipe)
    with pytest.raises(ValueError, match="stitched already"):
        stitch_pipeline(pipe, small_unet)
    unstitch_pipeline(pipe)
    assert pipe.unet is unet and type(pipe) is cls and "step" not in vars(pipe.scheduler)
    assert pipe.components["unet"] is unet
    assert (_run(pipe) == before).all()


def test_per_call_ratio_applies_to_that_call_only(small_unet):
    pipe = stitch_pipeline(t.sd_pipeline(seed=0), small_unet, ratio=0.3)
    _run(pipe, unet_s_ratio=0.8)
    assert pipe.unet.last_steps == [0] * 8 + [1] * 2
    _run(pipe)
    assert pipe.unet.last_steps == [0] * 3 + [1] * 7


def test_three_models_with_fractions(small_unet):
    middle = t.sd_unet(seed=8, widths=(8, 16), attention_head_dim=2)
    pipe = stitch_pipeline(t.sd_pipeline(seed=0), [small_unet, middle], fractions=[0.4, 0.2, 0.4])
    _run(pipe)
    assert pipe.unet.last_steps == [0] * 4 + [1] * 2 + [2] * 4
    with pytest.raises(ValueError, match="two-model shorthand"):
        _run(pipe, ratio=0.5)


def test_calling_the_stitched_denoiser_outside_a_pipeline_call_says_how(small_unet):
    pipe = stitch_pipeline(t.sd_pipeline(seed=0), small_unet, ratio=0.5)
    with pytest.raises(RuntimeError, match="picks its model by the step of a pipeline call"):
        pipe.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 3, 32))
