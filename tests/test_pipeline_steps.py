"""The one step tracker of diffusers pipelines (diffusion.pipeline_steps) through the real T-GATE, T-Stitch and
DeepCache pipeline paths, on PNDM, DPM-Solver++, Euler, Heun, LCM and FlowMatchEuler, with the denoiser called
once and twice per step (Heun's two entries, PNDM's warm-up entry, separate CFG passes, SD3's skip-layer pass),
img2img starting part-way, and no host copy per call.

The reference is each pipeline's own progress bar: every call of the real denoiser is recorded with the number
of progress-bar updates made before it, which is the step the user sees it in."""
import inspect

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.overrides import TorchFunctionMode

import tgate
from deep_cache import apply_deep_cache
from diffusion.attention import find_attention
from diffusion.pipeline_steps import PipelineSteps, first_entry_of_step, step_of_entry, steps_in_loop, warmup_entries
from tstitch import models_for_steps, stitch_pipeline

import tiny_mmdit as m
import tiny_sd as t
from loop_pipeline import LoopPipeline

SCHEDULERS = ["pndm", "dpmpp", "euler", "heun", "lcm", "flow"]
UNET_SCHEDULERS = SCHEDULERS[:-1]  # the stock SD pipelines scale their inputs: flow matching runs in SD3 / the loop
STEPS = 6


def _scheduler(name):
    return m.flow_scheduler() if name == "flow" else t.scheduler(name)


class ProgressBar:
    """Stands in for a pipeline's progress bar (`pipe.progress_bar(total=n)`): counts its updates."""

    def __init__(self):
        self.updates, self.total = 0, None

    def __call__(self, iterable=None, total=None):
        self.updates, self.total = 0, total
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.updates += n


class Calls:
    """Every call of the real denoisers: the progress-bar step it is made in, which model, its batch rows, the
    attention modules computed in it, and whether the U-Net ran in full (its mid block ran)."""

    def __init__(self, pipe, processor=None, **models):
        self.bar = pipe.progress_bar = ProgressBar()
        self.processor = processor
        self.calls = []
        self.handles = []
        for name, model in models.items():
            self.handles.append(model.register_forward_pre_hook(self._call(name), with_kwargs=True))
            mid = getattr(model, "mid_block", None)
            if mid is not None:  # DeepCache skips the mid block on cached steps
                self.handles.append(mid.resnets[0].register_forward_pre_hook(self._full))

    def _call(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.calls.append(dict(step=self.bar.updates, model=name, rows=x.shape[0], full=False,
                                   slg=kwargs.get("skip_layers") is not None,
                                   attention=self.processor.calls if self.processor else 0))
        return hook

    def _full(self, module, args):
        self.calls[-1]["full"] = True

    def get(self, key):
        return [c[key] for c in self.calls]

    def attention_per_call(self):
        marks = self.get("attention") + [self.processor.calls]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def remove(self):
        for handle in self.handles:
            handle.remove()


class CountingProcessor(AttnProcessor2_0):
    """The default attention processor, counting the attention modules that compute."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _stock_sd(name, cls=None):
    return t.sd_pipeline(0, scheduler_name=name, cls=cls)


def _run_sd(pipe, steps=STEPS, **extra):
    with torch.no_grad():
        return pipe(t.PROMPT, num_inference_steps=steps, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra).images


EMBEDS = torch.randn(2, 1, 5, t.TEXT_WIDTH, generator=torch.Generator().manual_seed(11))  # cond, uncond


def _loop(name):
    return LoopPipeline(t.sd_unet(0), _scheduler(name))


def _run_loop(pipe, passes, steps=STEPS, **extra):
    return pipe(EMBEDS[0], EMBEDS[1], num_inference_steps=steps, passes=passes,
                generator=torch.Generator().manual_seed(0), **extra)


def _sd3_small():
    return m.sd3_transformer(seed=7, num_layers=1, head_dim=4, dual_attention_layers=(0,))


def _run_sd3(pipe, steps=STEPS, **extra):
    return pipe(m.PROMPT, num_inference_steps=steps, height=m.IMAGE_SIZE, width=m.IMAGE_SIZE, output_type="latent",
                max_sequence_length=m.MAX_TOKENS, generator=torch.Generator().manual_seed(0), **extra).images


# --- the rule itself -------------------------------------------------------------------------------------------

def test_rule_on_the_loops_of_heun_and_pndm():
    assert [step_of_entry(e) for e in range(4)] == [0, 1, 2, 3]
    assert [step_of_entry(e, order=2) for e in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert [step_of_entry(e, warmup=1) for e in range(5)] == [0, 0, 1, 2, 3]
    assert [first_entry_of_step(s, order=2) for s in range(4)] == [0, 2, 4, 6]
    assert [first_entry_of_step(s, warmup=1) for s in range(4)] == [0, 2, 3, 4]
    assert (steps_in_loop(7, order=2), steps_in_loop(11, warmup=1), steps_in_loop(6), steps_in_loop(0)) == (4, 10, 6, 0)
    for name, entries, warmup in (("heun", 2 * STEPS - 1, 0), ("pndm", STEPS + 1, 1), ("euler", STEPS, 0)):
        scheduler = t.scheduler(name)
        scheduler.set_timesteps(STEPS)
        assert (len(scheduler.timesteps), warmup_entries(scheduler)) == (entries, warmup)
        assert steps_in_loop(entries, scheduler.order, warmup) == STEPS


def test_the_tracker_keeps_the_schedulers_step_as_it_was_and_nests():
    scheduler = t.scheduler("lcm")
    signature = inspect.signature(scheduler.step)
    outer, inner = PipelineSteps(), PipelineSteps()
    with outer.run(scheduler), inner.run(scheduler):
        # pipelines pass `generator` / `eta` only when step's signature shows them
        assert inspect.signature(scheduler.step) == signature and "generator" in signature.parameters
        scheduler.set_timesteps(3)
        x = torch.zeros(1, 4, 2, 2)
        for t_ in scheduler.timesteps:
            assert (outer.call().step, inner.call().step) == (outer.entries, inner.entries)
            x = scheduler.step(torch.zeros_like(x), t_, x).prev_sample
        assert outer.entries == inner.entries == 3 and [c.step for c in outer.log] == [0, 1, 2]
    assert "step" not in vars(scheduler) and not outer.running
    with pytest.raises(RuntimeError, match="outside a pipeline call"):
        outer.call()


# --- T-GATE -------------------------------------------------------------------------------------------------

GATE = dict(gate_step=3, sp_interval=2, fi_interval=2, warm_up=1)  # compute, cache, CFG mean, reuse / cache


@pytest.mark.parametrize("name", UNET_SCHEDULERS)
def test_tgate_on_stock_sd_pipelines_follows_the_progress_bar(name):
    config = tgate.TGateConfig(**GATE)
    pipe = _stock_sd(name)
    processor = CountingProcessor()
    pipe.unet.set_attn_processor(processor)
    plain = _run_sd(pipe)
    cross = [mod.is_cross_attention for _, mod in find_attention(pipe.unet)]
    with tgate.apply_tgate(pipe, config) as gate:
        calls = Calls(pipe, processor, unet=pipe.unet)
        gated = _run_sd(pipe)
        calls.remove()
    steps, log = calls.get("step"), gate.steps.log
    assert calls.bar.updates == STEPS and [c.step for c in log] == steps
    assert len(steps) == {"heun": 2 * STEPS - 1, "pndm": STEPS + 1}.get(name, STEPS)  # Heun: 2 per step
    warmup = [c.warmup for c in log]
    assert warmup == [name == "pndm"] + [False] * (len(log) - 1)  # PNDM's first entry, computed plainly
    # both CFG branches before the gate (and at the warm-up entry), one from the gate step on
    assert calls.get("rows") == [2 if w or s < GATE["gate_step"] else 1 for s, w in zip(steps, warmup, strict=True)]
    computed = []
    for s, w in zip(steps, warmup, strict=True):
        actions = tgate.PLAIN if w else config.actions(s)
        computed.append(sum((actions.cross_attn if c else actions.self_attn) is not tgate.Action.REUSE for c in cross))
    assert calls.attention_per_call() == computed and min(computed) < len(cross)
    assert _rel(gated, plain) > 1e-4


@pytest.mark.parametrize("name", SCHEDULERS)
def test_tgate_on_a_batched_cfg_loop_and_refused_with_separate_passes(name):
    """The loop of tests/loop_pipeline.py with one CFG-batched call per entry (every scheduler, flow matching
    included): guidance stops at the gate step the progress bar shows. With separate CFG passes T-GATE cannot
    cut the batch: refused at the second pass, and the pipeline is left as it was."""
    pipe = _loop(name)
    plain = _run_loop(pipe, passes=1)
    with tgate.apply_tgate(pipe, tgate.TGateConfig(**GATE)) as gate:
        calls = Calls(pipe, unet=pipe.unet)
        gated = _run_loop(pipe, passes=1)
        calls.remove()
        steps = calls.get("step")
        assert calls.bar.updates == STEPS and [c.step for c in gate.steps.log] == steps
        warmup = [c.warmup for c in gate.steps.log]
        assert calls.get("rows") == [2 if w or s < GATE["gate_step"] else 1 for s, w in zip(steps, warmup, strict=True)]
        with pytest.raises(RuntimeError, match=r"called its denoiser 2 times in one loop entry \(step 0\)"):
            _run_loop(pipe, passes=2)
    assert _rel(gated, plain) > 1e-4 and torch.equal(_run_loop(pipe, passes=1), plain)


@pytest.mark.parametrize("skip_layer_guidance", [False, True])
def test_tstitch_and_tgate_on_sd3_flow_matching_follow_the_progress_bar(skip_layer_guidance):
    """SD3 (FlowMatchEuler), stitched and with guidance truncation; with skip-layer guidance the transformer
    is called twice in steps 1 and 2 (0.01 * 6 < i < 0.5 * 6)."""
    small = _sd3_small()
    pipe = stitch_pipeline(m.sd3_pipeline(seed=0), small, ratio=0.5)
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_stop=0.5) if skip_layer_guidance else {}
    stitched = _run_sd3(pipe, **slg)
    with tgate.apply_tgate(pipe, tgate.TGateConfig(gate_step=4, cache_attention=False, branch="cond")) as gate:
        calls = Calls(pipe, small=small, large=pipe.transformer.large)
        both = _run_sd3(pipe, **slg)
        calls.remove()
    steps = calls.get("step")
    assert calls.bar.updates == STEPS
    assert [c.step for c in gate.steps.log] == [c.step for c in pipe.transformer.steps.log] == steps
    per_step = models_for_steps([0.5, 0.5], STEPS)
    assert calls.get("model") == [["small", "large"][per_step[s]] for s in steps]
    assert pipe.transformer.last_steps == per_step
    passes = [c.pass_index for c in pipe.transformer.steps.log]
    assert calls.get("slg") == [p == 1 for p in passes]
    assert calls.get("rows") == [1 if slg or s >= 4 else 2 for s, slg in zip(steps, calls.get("slg"), strict=True)]
    if skip_layer_guidance:  # counting denoiser calls would run ahead of the loop
        assert steps == [0, 1, 1, 2, 2, 3, 4, 5] and list(range(len(steps))) != steps
    assert _rel(both, stitched) > 1e-4


# --- T-Stitch -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", UNET_SCHEDULERS)
def test_tstitch_on_stock_sd_pipelines_follows_the_progress_bar(name):
    small = t.sd_unet(7, widths=(8, 16))
    pipe = stitch_pipeline(_stock_sd(name), small, ratio=0.5)
    calls = Calls(pipe, small=small, large=pipe.unet.large)
    stitched = _run_sd(pipe)
    calls.remove()
    steps = calls.get("step")
    per_step = models_for_steps([0.5, 0.5], STEPS)
    assert calls.get("model") == [["small", "large"][per_step[s]] for s in steps]
    assert [s for s, _ in pipe.unet.last_calls] == [c.step for c in pipe.unet.steps.log] == steps
    assert pipe.unet.last_steps == per_step and pipe.unet.steps_per_model() == {"small": 3, "large": 3}
    if name == "pndm":  # scheduler updates alone made PNDM's warm-up entry a step: 7 steps for 6
        assert [c.entry for c in pipe.unet.steps.log] != steps
    if name == "heun":  # counting denoiser calls: twice as many steps
        assert list(range(len(steps))) != steps
    large = _run_sd(pipe, ratio=0.0)
    assert _rel(stitched, large) > 1e-4 and _rel(stitched, _run_sd(pipe, ratio=1.0)) > 1e-4


@pytest.mark.parametrize("name", ["pndm", "heun", "euler"])
def test_tstitch_floor_rule_follows_upstreams_loop_entries(name):
    """Upstream's stitched SD pipelines (tstitch_sd_utils.py) pick the model by (i + 1) / len(timesteps) <= r on
    their loop index i: on PNDM (SD 1.x's own scheduler, as upstream's sd_demo.py runs) its warm-up entry counts,
    on Heun both entries of a step count; `floor` reproduces that entry by entry, `index` splits the steps."""
    small = t.sd_unet(7, widths=(8, 16))
    pipe = stitch_pipeline(_stock_sd(name), small, ratio=0.3, rule="floor")
    calls = Calls(pipe, small=small, large=pipe.unet.large)
    _run_sd(pipe, steps=10)
    calls.remove()
    entries = len(pipe.scheduler.timesteps)
    assert [c.entry for c in pipe.unet.steps.log] == list(range(entries))  # one U-Net call per entry
    upstream = ["small" if (i + 1) / entries <= 0.3 else "large" for i in range(entries)]
    assert calls.get("model") == upstream
    per_step = models_for_steps([0.3, 0.7], 10, "floor")
    by_steps = [["small", "large"][per_step[s]] for s in calls.get("step")]
    assert (by_steps != upstream) == (name != "euler")  # the floor formula on steps would differ there


@pytest.mark.parametrize("name", SCHEDULERS)
def test_tstitch_with_separate_guidance_passes(name):
    """Two U-Net calls per loop entry (unconditional, then conditional): both belong to the entry's step and go to
    its model, so the stitched loop equals the stitched batched-CFG loop."""
    small = t.sd_unet(7, widths=(8, 16))
    pipe = stitch_pipeline(_loop(name), small, ratio=0.5)
    batched = _run_loop(pipe, passes=1)
    calls = Calls(pipe, small=small, large=pipe.unet.large)
    separate = _run_loop(pipe, passes=2)
    calls.remove()
    steps, log = calls.get("step"), pipe.unet.steps.log
    per_step = models_for_steps([0.5, 0.5], STEPS)
    assert calls.bar.updates == STEPS and [c.step for c in log] == steps
    assert calls.get("model") == [["small", "large"][per_step[s]] for s in steps]
    assert [c.pass_index for c in log] == [0, 1] * (len(steps) // 2) and calls.get("rows") == [1] * len(steps)
    assert list(range(len(steps))) != steps  # counting denoiser calls would run twice as fast
    assert _rel(separate, batched) < 1e-5
    assert _rel(separate, _run_loop(pipe, passes=2, ratio=0.0)) > 1e-4  # the small model ran


# --- DeepCache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", UNET_SCHEDULERS)
def test_deep_cache_on_stock_sd_pipelines_caches_whole_steps(name):
    pipe = _stock_sd(name)
    plain = _run_sd(pipe)
    with apply_deep_cache(pipe, cache_interval=2, cache_branch_id=0) as handle:
        calls = Calls(pipe, unet=pipe.unet)
        cached = _run_sd(pipe)
        calls.remove()
    steps = calls.get("step")
    assert calls.bar.updates == STEPS and [c.step for c in handle.steps.log] == steps
    assert calls.get("full") == [s % 2 == 0 for s in steps]  # full at steps 0, 2, 4: every call of those steps
    if name in ("heun", "pndm"):  # counting U-Net calls would make other calls full
        assert calls.get("full") != [c % 2 == 0 for c in range(len(steps))]
    assert _rel(cached, plain) > 1e-3


@pytest.mark.parametrize("name", SCHEDULERS)
def test_deep_cache_with_separate_guidance_passes(name):
    """Each pass reuses its own features: the two-pass loop with DeepCache equals the batched-CFG loop with
    DeepCache. Counting U-Net calls instead (DeepCache on the bare U-Net) does not."""
    pipe = _loop(name)
    plain = _run_loop(pipe, passes=1)
    with apply_deep_cache(pipe, cache_interval=3, cache_branch_id=0) as handle:
        batched = _run_loop(pipe, passes=1)
        calls = Calls(pipe, unet=pipe.unet)
        separate = _run_loop(pipe, passes=2)
        calls.remove()
    steps = calls.get("step")
    assert [c.step for c in handle.steps.log] == steps and calls.bar.updates == STEPS
    assert calls.get("full") == [s % 3 == 0 for s in steps]
    assert _rel(separate, batched) < 1e-5 and _rel(batched, plain) > 1e-3
    with apply_deep_cache(pipe.unet, cache_interval=3, cache_branch_id=0):  # every U-Net call a step of its own
        by_calls = _run_loop(pipe, passes=2)
    assert _rel(by_calls, batched) > 1e-3


# --- all three on one img2img call ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pndm", "euler", "heun"])
def test_stacked_techniques_agree_on_the_steps_of_img2img(name):
    """Stitched, gated and cached img2img at strength 0.5 of 8 steps: the run makes the last 4 steps (PNDM: its
    start is looked up, with a warm-up entry; Euler and Heun: the scheduler's begin index); every technique puts
    every call in the step the progress bar shows."""
    from diffusers import StableDiffusionImg2ImgPipeline

    small = t.sd_unet(7, widths=(8, 16))
    pipe = stitch_pipeline(_stock_sd(name, cls=StableDiffusionImg2ImgPipeline), small, ratio=0.5)
    call = dict(steps=8, image=t.control_image(3), strength=0.5)
    plain = _run_sd(pipe, ratio=0.0, **call)
    gate = tgate.apply_tgate(pipe, tgate.TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0))
    cache = apply_deep_cache(pipe, cache_interval=2, cache_branch_id=0)
    calls = Calls(pipe, small=small, large=pipe.unet.large)
    out = _run_sd(pipe, **call)
    calls.remove()
    cache.remove()
    gate.remove()
    steps = calls.get("step")
    assert calls.bar.total == calls.bar.updates == 4
    assert [c.step for c in gate.steps.log] == [c.step for c in cache.steps.log] == steps
    assert [c.step for c in pipe.unet.steps.log] == steps
    assert pipe.unet.last_steps == [0, 0, 1, 1]
    assert calls.get("model") == ["small" if s < 2 else "large" for s in steps]
    warmup = [c.warmup for c in gate.steps.log]
    assert calls.get("rows") == [2 if w or s < 2 else 1 for s, w in zip(steps, warmup, strict=True)]
    # full: step 0 (first), 1 (T-GATE's CFG-mean step), 2 (the gate, and the large model's first); 3 cached
    assert calls.get("full") == [s != 3 for s in steps]
    assert _rel(out, plain) > 1e-4


# --- no host copy per call ------------------------------------------------------------------------------------

HOST_COPIES = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
               torch.Tensor.nonzero, torch.nonzero}


class HostCopies(TorchFunctionMode):
    """Counts the tensor operations that copy a value to the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_COPIES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["pndm", "euler", "heun"])
def test_no_host_copy_per_call(name):
    """What each technique adds to the host copies of a stock run, at 4 and at 8 steps: nothing for T-GATE and
    DeepCache; for T-Stitch one lookup of where the loop starts, per run (none when the scheduler has a
    begin index, as img2img sets)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    def copies(apply, steps, cls=None, **extra):
        pipe = _stock_sd(name, cls=cls)
        apply(pipe)
        with HostCopies() as counter:
            _run_sd(pipe, steps=steps, **extra)
        return counter.count

    techniques = {"tgate": lambda p: tgate.apply_tgate(p, tgate.TGateConfig(gate_step=2)),
                  "deep_cache": lambda p: apply_deep_cache(p, cache_interval=2),
                  "tstitch": lambda p: stitch_pipeline(p, t.sd_unet(7, widths=(8, 16)), ratio=0.5)}
    for steps in (4, 8):
        plain = copies(lambda p: None, steps)
        added = {key: copies(apply, steps) - plain for key, apply in techniques.items()}
        assert added["tgate"] == added["deep_cache"] == 0, added
        assert 0 < added["tstitch"] <= 2, added  # nonzero + int of one timestep lookup
    img2img = dict(cls=StableDiffusionImg2ImgPipeline, image=t.control_image(3), strength=0.5)
    if name != "pndm":  # schedulers with set_begin_index
        assert copies(techniques["tstitch"], 8, **img2img) == copies(lambda p: None, 8, **img2img)
