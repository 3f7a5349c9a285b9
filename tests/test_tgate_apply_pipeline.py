"""apply_tgate(pipe, config) on stock diffusers pipeline calls: equals the loaders, removes
cleanly, keeps custom attention processors, counts steps from the pipeline's own loop
(img2img, second-order schedulers), truncates guidance for ControlNet too."""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diffusion.attention import find_attention
from tgate import (
    Action,
    DeepCacheConfig,
    TGateConfig,
    TgatePixArtAlphaLoader,
    TgateSDDeepCacheLoader,
    TgateSDLoader,
    TgateSDXLLoader,
    TgateSVDLoader,
    apply_tgate,
    is_gated,
    remove_tgate,
)
from tgate.steps import step_of_call

from tgate_parity import GATE, PIXART, TEXT
from tiny_pipelines import load_tiny, save_tiny, svd_image

SVD_CALL = dict(height=16, width=16, num_frames=2, num_inference_steps=5, output_type="latent")


def _pipe(kind, folder):
    save_tiny(kind, folder)
    return load_tiny(kind, folder)


def _latents(pipe, call, seed=0):
    with torch.no_grad():
        out = pipe(**call, generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images


def _tgate_latents(pipe, call, seed=0, **settings):
    with torch.no_grad():
        out = pipe.tgate(**call, **settings, generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images


def _snapshot(pipe):
    """Per module of every diffusers model of the pipeline: its hooks, instance forward and hook
    registry (the transformers text encoders install hooks of their own on first use; the gate
    touches none of them)."""
    state = {}
    for key, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and type(component).__module__.startswith("diffusers"):
            for name, module in component.named_modules():
                state[key, name] = (tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
                                    "forward" in vars(module), hasattr(module, "_diffusers_hook"))
    return state


def _no_trace(pipe, cls, before):
    """Nothing of the gate is left on the pipeline or its modules."""
    assert type(pipe) is cls and not is_gated(pipe)
    assert _snapshot(pipe) == before


def _record_rows(module):
    """Rows of the sample input of each call of `module` (2B while guidance runs, B after)."""
    rows = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: rows.append(
        (args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0]), with_kwargs=True)
    return rows, handle


CASES = {  # kind -> (loader, call, config of the equivalent apply_tgate)
    "sd": (TgateSDLoader, TEXT, TGateConfig(**GATE)),
    "sdxl": (TgateSDXLLoader, TEXT, TGateConfig(**GATE)),
    "pixart_alpha": (TgatePixArtAlphaLoader, PIXART, TGateConfig(**GATE)),
    "svd": (TgateSVDLoader, SVD_CALL, TGateConfig(**GATE, branch="cond")),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_apply_tgate_on_the_stock_call_equals_the_loader_and_removes_cleanly(kind, tiny_pipelines_dir):
    loader, call, config = CASES[kind]
    call = dict(call, image=svd_image()) if kind == "svd" else call
    pipe = _pipe(kind, tiny_pipelines_dir)
    cls, before = type(pipe), _snapshot(pipe)
    plain = _latents(pipe, call)
    with apply_tgate(pipe, config) as gate:
        assert is_gated(pipe) and type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls)
        gated = _latents(pipe, call)
        assert torch.equal(_latents(pipe, call), gated)  # each call is one run: caches start empty
    assert gate.removed
    _no_trace(pipe, cls, before)
    assert torch.equal(_latents(pipe, call), plain)  # bitwise the stock pipeline again
    settings = {k: getattr(config, k) for k in ("gate_step", "sp_interval", "fi_interval", "warm_up")}
    assert torch.equal(_tgate_latents(loader(pipe), call, **settings), gated)
    assert not torch.allclose(gated, plain, rtol=1e-4, atol=0)
    _no_trace(pipe, cls, before)


class CountingProcessor(AttnProcessor2_0):
    """The default processor, counting its calls: a custom processor the gate must keep using."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return super().__call__(attn, hidden_states, *args, **kwargs) * 1.5  # visibly not the default


def test_custom_attention_processor_is_used_on_computed_steps(tiny_pipelines_dir):
    pipe = _pipe("sd", tiny_pipelines_dir)
    processor = CountingProcessor()
    pipe.unet.set_attn_processor(processor)
    modules = [m for _, m in find_attention(pipe.unet)]
    n_cross = sum(m.is_cross_attention for m in modules)
    n_self = len(modules) - n_cross
    config = TGateConfig(**GATE)
    per_call = []
    counter = pipe.unet.register_forward_hook(lambda *a: per_call.append(processor.calls - sum(per_call)))
    with apply_tgate(pipe, config):
        gated = _latents(pipe, TEXT)
    counter.remove()
    expected = []
    for s in range(TEXT["num_inference_steps"]):
        actions = config.actions(s)
        expected.append(n_self * (actions.self_attn is not Action.REUSE)
                        + n_cross * (actions.cross_attn is not Action.REUSE))
    assert per_call == expected and min(expected) < len(modules)  # some steps reused outputs
    # the processor's output (x1.5) is in the result: with the default processor it differs
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with apply_tgate(pipe, config):
        default = _latents(pipe, TEXT)
    assert not torch.allclose(gated, default)


def test_img2img_counts_the_steps_of_its_own_loop(tiny_pipelines_dir):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**_pipe("sd", tiny_pipelines_dir).components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    call = dict(prompt="a cat", image=image, strength=0.5, num_inference_steps=8, output_type="latent")
    plain = _latents(pipe, call)
    with apply_tgate(pipe, TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)):
        rows, handle = _record_rows(pipe.unet)  # after the gate's own hook: sees what the model gets
        gated = _latents(pipe, call)
        handle.remove()
    # 4 of 8 steps run (strength 0.5); the gate is at the loop's step 2, not the schedule's
    assert rows == [2, 2, 1, 1]
    assert not torch.allclose(gated, plain) and torch.equal(_latents(pipe, call), plain)


def test_second_order_scheduler_counts_two_calls_per_step(tiny_pipelines_dir):
    from diffusers import HeunDiscreteScheduler

    pipe = _pipe("sd", tiny_pipelines_dir)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with apply_tgate(pipe, TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)):
        rows, handle = _record_rows(pipe.unet)
        _latents(pipe, dict(TEXT, num_inference_steps=4))
        handle.remove()
    assert rows == [2, 2, 2, 2, 1, 1, 1]  # steps {0,1} {2,3} {4,5} {6}: one branch from step 2


def test_step_of_call():
    assert [step_of_call(c) for c in range(4)] == [0, 1, 2, 3]
    assert [step_of_call(c, order=2) for c in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert [step_of_call(c, order=1, warmup=2) for c in range(5)] == [None, None, 0, 1, 2]


def test_controlnet_pipeline_runs_one_branch_after_the_gate(tiny_pipelines_dir):
    pipe = _pipe("sd_controlnet", tiny_pipelines_dir)
    cls, before = type(pipe), _snapshot(pipe)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    call = dict(TEXT, image=control, num_inference_steps=6)
    plain = _latents(pipe, call)
    with apply_tgate(pipe, TGateConfig(gate_step=3, sp_interval=1, fi_interval=1, warm_up=0)):
        unet_rows, h1 = _record_rows(pipe.unet)
        control_rows, h2 = _record_rows(pipe.controlnet)
        gated = _latents(pipe, call)
        assert unet_rows == control_rows == [2, 2, 2, 1, 1, 1]
        del unet_rows[:], control_rows[:]
        _latents(pipe, dict(call, guess_mode=True))  # the ControlNet sees the conditional rows only
        assert unet_rows == [2, 2, 2, 1, 1, 1] and control_rows == [1] * 6
        h1.remove(), h2.remove()
    _no_trace(pipe, cls, before)
    assert not torch.allclose(gated, plain) and torch.equal(_latents(pipe, call), plain)


def test_deepcache_with_apply_tgate_equals_the_deepcache_loader(tiny_pipelines_dir):
    pipe = _pipe("sd", tiny_pipelines_dir)
    cls, before = type(pipe), _snapshot(pipe)
    plain = _latents(pipe, TEXT)
    config = TGateConfig(gate_step=5, sp_interval=1, fi_interval=1, warm_up=0)
    with apply_tgate(pipe, config, deepcache=DeepCacheConfig(cache_interval=2, cache_branch_id=0)):
        gated = _latents(pipe, TEXT)
    _no_trace(pipe, cls, before)
    assert torch.equal(_latents(pipe, TEXT), plain)
    loaded = TgateSDDeepCacheLoader(pipe, cache_interval=2, cache_branch_id=0)
    assert torch.equal(_tgate_latents(loaded, TEXT, gate_step=5), gated)
    with apply_tgate(pipe, config):  # DeepCache changes the result
        assert not torch.allclose(_latents(pipe, TEXT), gated)
    assert torch.equal(_latents(pipe, TEXT), plain)


def test_loader_lcm_default_as_in_the_readme(tiny_pipelines_dir):
    pipe = TgateSDXLLoader(_pipe("sdxl_lcm", tiny_pipelines_dir), lcm=True)
    call = dict(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="latent")
    settings = dict(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0)
    assert torch.equal(_tgate_latents(pipe, call, **settings), _tgate_latents(pipe, call, lcm=True, **settings))


def test_bad_use_is_refused_and_the_pipeline_is_restored_after_an_error(tiny_pipelines_dir):
    pipe = _pipe("sd", tiny_pipelines_dir)
    cls, before = type(pipe), _snapshot(pipe)
    with pytest.raises(ValueError, match="lcm=true"):  # lcm promises no CFG batch
        with apply_tgate(pipe, TGateConfig(lcm=True)):
            _latents(pipe, TEXT)
    _no_trace(pipe, cls, before)
    gate = apply_tgate(pipe, TGateConfig())
    with pytest.raises(ValueError, match="already applied"):
        apply_tgate(pipe, TGateConfig())
    remove_tgate(pipe)
    remove_tgate(pipe)  # a second removal is a no-op
    assert gate.removed
    _no_trace(pipe, cls, before)
    pipe = TgateSDLoader(pipe)
    with pytest.raises(ValueError, match="divisible by 8"):  # the pipeline's own check raises mid-call
        pipe.tgate(**dict(TEXT, height=30))
    _no_trace(pipe, cls, before)
    with pytest.raises(TypeError, match="allowed: lcm"):
        TgateSDLoader(pipe, gate=3)
    with pytest.raises(ValueError, match="expects a pipeline with a `transformer`"):
        TgatePixArtAlphaLoader(pipe)
    with pytest.raises(ValueError, match="cache_interval=0"):
        DeepCacheConfig(cache_interval=0)
    with pytest.raises(ValueError, match="deepcache"):
        apply_tgate(_pipe("pixart_alpha", tiny_pipelines_dir), TGateConfig(), deepcache=DeepCacheConfig())
    with pytest.raises(ValueError, match="gate_step=0"):
        pipe.tgate(**TEXT, gate_step=0)


def test_the_readme_examples_run_on_tiny_pipelines(tiny_pipelines_dir):
    """The T-GATE README's examples, line for line, with tiny pipelines instead of the hub ones."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler
    from PIL import Image

    from tgate import TgatePixArtSigmaLoader, TgateSDXLDeepCacheLoader

    for kind, loader in (("pixart_alpha", TgatePixArtAlphaLoader), ("pixart_sigma", TgatePixArtSigmaLoader)):
        pipe = loader(_pipe(kind, tiny_pipelines_dir)).to("cpu")
        image = pipe.tgate("An alpaca made of colorful building blocks, cyberpunk.", gate_step=15, sp_interval=3,
                           fi_interval=1, warm_up=2, num_inference_steps=25, use_resolution_binning=False).images[0]
        assert isinstance(image, Image.Image)
    prompt = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k."
    pipe = TgateSDXLLoader(_pipe("sdxl", tiny_pipelines_dir)).to("cpu")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.tgate(prompt, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2,
                                 num_inference_steps=25).images[0], Image.Image)
    pipe = TgateSDXLDeepCacheLoader(_pipe("sdxl", tiny_pipelines_dir), cache_interval=3, cache_branch_id=0).to("cpu")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.tgate(prompt, gate_step=10, sp_interval=1, fi_interval=1, warm_up=0,
                                 num_inference_steps=25).images[0], Image.Image)
    pipe = _pipe("sdxl_lcm", tiny_pipelines_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe = TgateSDXLLoader(pipe, lcm=True).to("cpu")
    assert isinstance(pipe.tgate(prompt, gate_step=1, sp_interval=1, fi_interval=1, warm_up=0,
                                 num_inference_steps=4).images[0], Image.Image)
