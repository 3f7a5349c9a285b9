"""DeepCache on diffusers U-Nets (deep_cache.unet2d / apply_deep_cache): parity with the DeepCache
package's DeepCacheSDHelper and with tgate 1.0.0's DeepCache loaders on tiny offline SD and SD-XL
pipelines, bitwise removal, T-Stitch, the configs (scripts/sample.py) and MACs counting."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from deep_cache import DeepCacheHook, allowed_branch_ids, apply_deep_cache, deep_cache_of, remove_deep_cache
from deep_cache.unet2d import UNet2DFeatureCache
from runs.run import run_from_config

import tiny_sd as t
from tgate_parity import CASES, call_arguments, output_latents, run_case
from tiny_pipelines import load_tiny, save_tiny

CALL = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=8, guidance_scale=6.0,
            output_type="latent")


def _sd_two_resnets(seed=0):
    """SD 1.x's layout at tiny width: two resnets per down block (three layers per level with the
    downsampler), the layout DeepCache's `id // 3, id % 3` is written for."""
    unet = t.sd_unet(seed, widths=(16, 32), layers_per_block=2)
    return t.sd_pipeline(seed, unet=unet)


def _tgate_parity_pipeline(kind):
    """The tiny pipelines the tgate 1.0.0 parity cases run (tests/tiny_pipelines.py)."""
    import tiny_pipelines

    def build():
        pipe = getattr(tiny_pipelines, kind)()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    return build


PIPELINES = {"sd_two_resnets": _sd_two_resnets, "sd": lambda: t.sd_pipeline(0), "sdxl": lambda: t.sdxl_pipeline(0),
             "tgate_cases_sd": _tgate_parity_pipeline("sd"), "tgate_cases_sdxl": _tgate_parity_pipeline("sdxl")}


def _call(pipe, **extra):
    with torch.no_grad():
        out = pipe(**{**CALL, "height": 64, "width": 64, **extra}, generator=torch.Generator().manual_seed(0))
    return out.images


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _helper_latents(pipe, interval, branch):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return _call(pipe)
    finally:
        helper.disable()
        for module in pipe.unet.modules():  # the helper leaves the class's forward as an instance attribute
            if "forward" in vars(module) and getattr(module.forward, "__func__", None) is type(module).forward:
                del module.forward


def _module_state(unet):
    """What removal must restore: parameters, buffers, and no instance-level attribute left on any module."""
    return ({k: v.clone() for k, v in unet.state_dict().items()},
            {name: sorted(vars(m)) for name, m in unet.named_modules()})


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_matches_the_deepcache_package_for_every_branch(kind):
    pipe = PIPELINES[kind]()
    pipe.set_progress_bar_config(disable=True)
    plain = _call(pipe)
    branches = allowed_branch_ids(pipe.unet)
    assert len(branches) >= 4 and (kind != "sd_two_resnets" or branches == [0, 1, 2, 3, 4, 5])
    results = {}
    for branch in branches:
        want = _helper_latents(pipe, 3, branch)
        with apply_deep_cache(pipe, cache_interval=3, cache_branch_id=branch):
            ours = _call(pipe)
        assert _rel(ours, want) <= 1e-5, (kind, branch, _rel(ours, want))
        assert _rel(ours, plain) > 1e-3, (kind, branch)  # cached steps really ran shallow
        results[branch] = ours
    assert _rel(results[branches[0]], results[branches[1]]) > 1e-4  # the branch id matters
    assert torch.equal(_call(pipe), plain)  # and nothing stayed behind


def test_interval_one_is_the_plain_pipeline_and_removal_restores_everything_bitwise():
    pipe = t.sdxl_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    cls, before = type(pipe), _module_state(pipe.unet)
    plain = _call(pipe)
    handle = apply_deep_cache(pipe, cache_interval=1, cache_branch_id=1)
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls) and deep_cache_of(pipe) is handle
    assert torch.equal(_call(pipe), plain)  # every call full: the plain U-Net
    handle.remove()
    handle.remove()  # idempotent
    after = _module_state(pipe.unet)
    assert type(pipe) is cls and deep_cache_of(pipe) is None
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert torch.equal(_call(pipe), plain)
    with apply_deep_cache(pipe, cache_interval=2, cache_branch_id=0):
        assert _rel(_call(pipe), plain) > 1e-3
    remove_deep_cache(pipe)  # nothing applied: nothing to do
    assert _module_state(pipe.unet)[1] == before[1]


def test_each_pipeline_call_starts_with_empty_caches_and_a_bare_unet_call_is_plain():
    pipe = t.sd_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    with apply_deep_cache(pipe, cache_interval=3, cache_branch_id=0) as handle:
        first, second = _call(pipe), _call(pipe, num_inference_steps=7)
        again = _call(pipe)
        assert torch.equal(first, again)  # the 7-step call in between left nothing behind
        assert all(c.shape is None for c in handle.caches)  # features freed after each call
        x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 5, t.TEXT_WIDTH)
        with torch.no_grad():
            hooked = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    with torch.no_grad():
        assert torch.equal(hooked, pipe.unet(x, 10, encoder_hidden_states=emb).sample)
    assert second.shape == first.shape


@pytest.fixture(scope="module")
def tiny_dir(tiny_pipelines_dir):
    for kind in ("sd", "sdxl"):
        save_tiny(kind, tiny_pipelines_dir)
    return tiny_pipelines_dir


@pytest.mark.parametrize("case", ["sd_deepcache", "sdxl_deepcache"])
@pytest.mark.parametrize("order", ["deep_cache_first", "tgate_first"])
def test_with_tgate_equals_the_tgate_1_0_0_deepcache_loaders(case, order, tiny_dir, tgate_reference):
    """tgate 1.0.0's Tgate*DeepCacheLoader (DeepCache's helper, restarted at gate_step - 1 and gate_step)
    against apply_deep_cache + apply_tgate on the stock pipeline call."""
    import tgate

    kind, _, loader_kwargs, _ = CASES[case]
    want = run_case(tgate_reference, case, tiny_dir)
    pipe = load_tiny(kind, tiny_dir)

    def plain_call():  # the case's call without tgate's keywords, with a fresh seeded generator
        return {k: v for k, v in call_arguments(case).items() if k != "gate_step"}

    config = tgate.TGateConfig(gate_step=CASES[case][3]["gate_step"], sp_interval=1, fi_interval=1, warm_up=0)
    if order == "deep_cache_first":
        handles = [apply_deep_cache(pipe, **loader_kwargs), tgate.apply_tgate(pipe, config)]
    else:
        handles = [tgate.apply_tgate(pipe, config), apply_deep_cache(pipe, **loader_kwargs)]
    with torch.no_grad():
        ours = output_latents(pipe(**plain_call()))
    for handle in reversed(handles):
        handle.remove()
    assert _rel(ours, want) <= 1e-5, _rel(ours, want)
    with apply_deep_cache(pipe, **loader_kwargs), torch.no_grad():
        deep_cache_alone = output_latents(pipe(**plain_call()))
    assert _rel(deep_cache_alone, want) > 1e-4  # T-GATE acted (and restarted DeepCache at its gate)
    assert type(pipe) is type(load_tiny(kind, tiny_dir))


def _full_calls(monkeypatch):
    """Record, per U-Net call inside a run, (id of the U-Net, whether the call was full)."""
    calls = []
    real = UNet2DFeatureCache.new_forward

    def spy(self, unet, *args, **kwargs):
        if self.owner.active:
            shape = tuple((args[0] if args else kwargs["sample"]).shape)
            calls.append((id(unet), self.is_full(shape)))
        return real(self, unet, *args, **kwargs)

    monkeypatch.setattr(UNet2DFeatureCache, "new_forward", spy)
    return calls


def test_stitched_pipeline_gets_a_cache_per_model_and_a_full_step_at_the_switch(monkeypatch):
    from tstitch import stitch_pipeline

    small = t.sd_unet(seed=7, widths=(8, 16))
    pipe = t.sd_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    large = pipe.unet
    stitch_pipeline(pipe, small, ratio=0.5)
    calls = _full_calls(monkeypatch)
    with apply_deep_cache(pipe, cache_interval=3, cache_branch_id=0) as handle:
        assert len(handle.caches) == 2
        _call(pipe)
    # small: steps 0-3 (full at 0, 3); large: steps 4-7, its first call full whatever the interval (4, 7)
    assert calls == [(id(small), True), (id(small), False), (id(small), False), (id(small), True),
                     (id(large), True), (id(large), False), (id(large), False), (id(large), True)]


def test_tgate_restarts_it_at_the_gate(monkeypatch):
    import tgate

    pipe = t.sd_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    calls = _full_calls(monkeypatch)
    with apply_deep_cache(pipe, cache_interval=3, cache_branch_id=0):
        with tgate.apply_tgate(pipe, tgate.TGateConfig(gate_step=5, sp_interval=1, fi_interval=1, warm_up=0)):
            _call(pipe)
    # full at 0, 3, gate_step - 1 = 4, gate_step = 5 (the batch halves there too), then 8 would be next
    assert [full for _, full in calls] == [True, False, False, True, True, True, False, False]


def test_bad_use_is_refused():
    pipe = t.sd_pipeline(0)
    with pytest.raises(ValueError, match=r"cache_branch_id=2: this UNet2DConditionModel has branches \[0, 1, 3, 4\]"):
        apply_deep_cache(pipe, cache_interval=3, cache_branch_id=2)
    assert not hasattr(pipe.unet, "_diffusers_hook") and deep_cache_of(pipe) is None  # nothing half-applied
    with pytest.raises(ValueError, match="cache_interval=0: must be an integer >= 1"):
        apply_deep_cache(pipe, cache_interval=0)
    with apply_deep_cache(pipe):
        with pytest.raises(ValueError, match="deep_cache is already applied"):
            apply_deep_cache(pipe)
    with pytest.raises(ValueError, match="has a `transformer`; DeepCache needs a U-Net pipeline"):
        apply_deep_cache(t.pixart_pipeline(0))
    with pytest.raises(TypeError, match="expected a diffusers pipeline or a U-Net module"):
        apply_deep_cache("unet")


# --- through the configs: scripts/sample.py (model kind: pipeline) and scripts/count_macs.py ---

PROMPTS = ["a squirrel in the park", "a red car"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_pipe") / "sd"
    t.sd_pipeline(0).save_pretrained(folder)
    return folder


def _overrides(folder, *extra):
    return ["model=sd15", "sampler=pipeline", f"model.source={folder}", "model.image_size=64", "sampler.steps=6",
            "num_samples=2", "batch_size=2", f"prompts={json.dumps(PROMPTS)}", "progress=false", "num_threads=1",
            "device=cpu", *extra]


def _pngs(folder, n=2):
    from PIL import Image

    return [np.asarray(Image.open(folder / f"{k:06d}.png")) for k in range(n)]


def _manual(folder, *handles_of):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    handles = [apply(pipe) for apply in handles_of]
    out = pipe(PROMPTS, num_inference_steps=6, guidance_scale=7.5, height=64, width=64, output_type="np",
               generator=[torch.Generator().manual_seed(k) for k in range(2)]).images
    for handle in reversed(handles):
        handle.remove()
    return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def test_accel_deep_cache_on_a_pipeline_through_the_configs(compose_sample, sd_folder, tmp_path):
    import tgate

    metrics = run_from_config(compose_sample(*_overrides(sd_folder, "accel=deep_cache",
                                                         "accel.deep_cache.cache_branch_id=1")), tmp_path / "dc")
    assert metrics["accel"] == "deep_cache"
    want = _manual(sd_folder, lambda p: apply_deep_cache(p, cache_interval=3, cache_branch_id=1))
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "dc"), want, strict=True))
    run_from_config(compose_sample(*_overrides(sd_folder)), tmp_path / "plain")
    assert not all((a == b).all() for a, b in zip(_pngs(tmp_path / "dc"), _pngs(tmp_path / "plain"), strict=True))
    gate = ["accel=[deep_cache,tgate]", "accel.tgate.gate_step=3", "accel.tgate.sp_interval=1",
            "accel.tgate.warm_up=0", "accel.tgate.branch=uncond"]
    run_from_config(compose_sample(*_overrides(sd_folder, *gate)), tmp_path / "both")
    config = tgate.TGateConfig(gate_step=3, sp_interval=1, fi_interval=1, warm_up=0)
    want = _manual(sd_folder, lambda p: tgate.apply_tgate(p, config), lambda p: apply_deep_cache(p, 3, 0))
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "both"), want, strict=True))


def test_accel_deep_cache_on_an_sdxl_pipeline_through_the_configs(compose_sample, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "sdxl"
    t.sdxl_pipeline(0).save_pretrained(folder)
    common = ["model=sdxl", "sampler=pipeline", f"model.source={folder}", "model.load.variant=null",
              "model.image_size=64", "sampler.steps=6", "num_samples=1", "batch_size=1", "prompts=[a red car]",
              "progress=false", "device=cpu"]
    run_from_config(compose_sample(*common, "accel=deep_cache", "accel.deep_cache.cache_branch_id=3"), tmp_path / "dc")
    run_from_config(compose_sample(*common), tmp_path / "plain")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with apply_deep_cache(pipe, cache_interval=3, cache_branch_id=3):
        out = pipe("a red car", num_inference_steps=6, guidance_scale=5.0, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
    want = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    ours, plain = _pngs(tmp_path / "dc", 1)[0], _pngs(tmp_path / "plain", 1)[0]
    assert (ours == want).all() and not (ours == plain).all()


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("accel", ["deep_cache", "[tgate,deep_cache]", "[deep_cache,tgate]",
                                   "[tstitch,deep_cache]", "[deep_cache,tgate,tstitch]"])
def test_deep_cache_configs_compose_for_the_unet_pipelines(compose_sample, model, accel):
    from diffusion.errors import UserError
    from runs.pipeline_run import check_pipeline_config

    cfg = compose_sample(f"model={model}", "sampler=pipeline", f"accel={accel}", "prompts=[a cat]")
    if model == "sd21" and "tstitch" in accel:  # configs/family/sd21.yaml names no partner
        with pytest.raises(UserError, match="has no T-Stitch partner"):
            check_pipeline_config(cfg)
        return
    _, _, accels = check_pipeline_config(cfg)
    names = [a.name for a in accels]
    assert names[-1] == "deep_cache" and names.index("deep_cache") == len(names) - 1  # after stitching / gating
    assert accels[-1].settings == {"cache_interval": 3, "cache_branch_id": 0}


def test_sampler_hook_counts_diffusers_unet_macs_step_by_step():
    """DeepCacheHook on a diffusers U-Net in our loop (what scripts/count_macs.py runs on meta):
    full steps cost the plain forward, cached ones only the shallow parts."""
    from runs.count_macs import count_run

    unet = t.sd_unet(0, layers_per_block=2).to("meta")
    model_cfg = OmegaConf.create({"name": "sd", "image_size": 64, "text_length": 5})
    plain = count_run([unet], [model_cfg], 7, use_cfg=True)
    per_forward = plain["per_step"][0]["macs_all"]
    hook = DeepCacheHook(cache_interval=3, cache_branch_id=1)
    hook.attach([unet], ["sd"], None)
    try:
        cached = count_run([unet], [model_cfg], 7, use_cfg=True, hooks=[hook])
    finally:
        hook.detach()
    costs = [s["macs_all"] for s in cached["per_step"]]
    assert [c == per_forward for c in costs] == [True, False, False, True, False, False, True]
    assert 0 < costs[1] == costs[2] < per_forward / 2
    assert not hasattr(unet, "_diffusers_hook")


def test_stitched_and_cached_pipeline_run_through_the_configs(compose_sample, sd_folder, tmp_path):
    from tstitch import stitch_pipeline

    small = tmp_path / "small_unet"
    t.sd_unet(7, widths=(8, 16)).save_pretrained(small)
    both = ["accel=[deep_cache,tstitch]", f"family.stitch.small.source={small}", "accel.tstitch.ratio=0.5"]
    metrics = run_from_config(compose_sample(*_overrides(sd_folder, *both)), tmp_path / "both")
    assert list(metrics["steps_per_model"].values()) == [3, 3] and metrics["accel"] == "tstitch+deep_cache"

    def stitched_then_cached(pipe):
        stitch_pipeline(pipe, str(small), ratio=0.5)
        return apply_deep_cache(pipe, cache_interval=3, cache_branch_id=0)

    want = _manual(sd_folder, stitched_then_cached)
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "both"), want, strict=True))
    stitched = ["accel=tstitch", f"family.stitch.small.source={small}", "accel.tstitch.ratio=0.5"]
    run_from_config(compose_sample(*_overrides(sd_folder, *stitched)), tmp_path / "stitched")
    assert not all((a == b).all() for a, b in zip(_pngs(tmp_path / "both"), _pngs(tmp_path / "stitched"), strict=True))
