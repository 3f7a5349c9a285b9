"""apply_tgate / remove_tgate on native DiT and diffusers models; the sampler-level hook."""
import importlib

import pytest
import torch

from diffusion.attention import find_attention
from diffusion.sampler import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import build_solver
from tgate import Action, TGateConfig, TGateHook, apply_tgate, is_gated, remove_tgate
from tstitch import TStitchHook

from tgate_tiny import MAKERS, native_dit

STEPS = 8


def _step_inputs(n=STEPS, seed=7):
    """A different latent per step, as along a trajectory (the text / class stays fixed)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 8, 8, generator=gen) for _ in range(n)]


def _run_steps(model, call, state=None, n=STEPS):
    """Drive the schedule by hand: 2 rows while guidance runs, then 1 (the uncond branch)."""
    outs = []
    if state is not None:
        state.start(use_cfg=True)
    for s, x in enumerate(_step_inputs(n)):
        rows = 2
        if state is not None:
            rows = 2 if state.step(s).guidance else 1
        outs.append(call(model, rows, x))
    if state is not None:
        state.end()
    return outs


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_gate_off_is_bitwise_plain_and_remove_restores_the_model(kind):
    model, call = MAKERS[kind]()
    with torch.no_grad():
        plain = _run_steps(model, call)
        # gate past the last step, self-attention recomputed at every step: nothing is reused
        state = apply_tgate(model, TGateConfig(gate_step=STEPS + 1, sp_interval=1, fi_interval=1, warm_up=0))
        assert is_gated(model) and len(state.module_hooks) == len(list(find_attention(model)))
        gated_off = _run_steps(model, call, state)
        remove_tgate(model)
        removed = _run_steps(model, call)
        # a real gate reuses attention (and drops a branch): the comparisons above can fail
        gated = _run_steps(model, call, apply_tgate(model, TGateConfig(gate_step=3, sp_interval=2, warm_up=0)))
        remove_tgate(model)
    assert all(torch.equal(a, b) for a, b in zip(plain, gated_off, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, removed, strict=True))
    assert all(p.abs().max() > 0 for p in plain)
    assert any(a.shape == b.shape and not torch.allclose(a, b, rtol=1e-4, atol=0)
               for a, b in zip(plain, gated, strict=True))
    assert not is_gated(model) and state.module_hooks == []
    for _, module in find_attention(model):  # no trace left on the modules
        assert "forward" not in vars(module) and not hasattr(module, "_diffusers_hook")


def _record(model):
    """Per attention module: how often its projections ran, and its outputs, per call."""
    log = {}
    for name, module in find_attention(model):
        proj = getattr(module, "qkv", None) or module.to_q
        entry = log.setdefault(name, {"computed": 0, "outputs": []})
        proj.register_forward_hook(lambda m, i, o, e=entry: e.__setitem__("computed", e["computed"] + 1))
        module.register_forward_hook(lambda m, i, o, e=entry: e["outputs"].append(o))
    return log


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_reuse_computes_nothing_and_returns_what_was_cached(kind):
    model, call = MAKERS[kind]()
    config = TGateConfig(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    state = apply_tgate(model, config)
    log = _record(model)
    crosses = {name: m.is_cross_attention for name, m in find_attention(model)}
    computed_before = {name: 0 for name in log}
    with torch.no_grad():
        state.start(use_cfg=True)
        cached = {}
        for s, x in enumerate(_step_inputs()):
            actions = state.step(s)
            call(model, 2 if actions.guidance else 1, x)
            for name, entry in log.items():
                action = actions.cross_attn if crosses[name] else actions.self_attn
                out = entry["outputs"][-1]
                ran = entry["computed"] - computed_before[name]
                computed_before[name] = entry["computed"]
                if action is Action.REUSE:
                    assert ran == 0 and out is cached[name], (s, name)
                else:
                    assert ran == 1, (s, name)
                if action is Action.CACHE:
                    cached[name] = out
                elif action is Action.CACHE_CFG_MEAN:
                    assert out.shape[0] == 2
                    cached[name] = state.module_hooks[list(log).index(name)].cache
                    torch.testing.assert_close(cached[name], out.mean(0, keepdim=True))
        state.end()
    assert all(h.cache is None for h in state.module_hooks)  # freed at the end of the run


def test_each_run_starts_with_empty_caches_and_repeats_exactly():
    model, call = native_dit()
    state = apply_tgate(model, TGateConfig(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1))
    with torch.no_grad():
        first = _run_steps(model, call, state)
        state.start(use_cfg=True)
        assert all(h.cache is None for h in state.module_hooks)
        state.step(0)
        call(model, 2)  # a run with other inputs, abandoned mid-way with caches filled
        state.step(1)
        call(model, 2)
        second = _run_steps(model, call, state)
        remove_tgate(model)
        plain = _run_steps(model, call)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # the gated steps differ from the plain model's (a cache kept from the abandoned run would differ too)
    assert any(a.shape == b.shape and not torch.allclose(a, b, rtol=1e-4, atol=0)
               for a, b in zip(first, plain, strict=True))


def test_bad_use_is_refused():
    model, _ = native_dit()
    apply_tgate(model, TGateConfig())
    with pytest.raises(ValueError, match="already applied"):
        apply_tgate(model, TGateConfig())
    with pytest.raises(ValueError, match="no attention module marked"):
        apply_tgate(torch.nn.Linear(2, 2), TGateConfig())
    from diffusers.models.attention_processor import Attention

    block = torch.nn.Sequential(Attention(8, heads=2, dim_head=4, residual_connection=True))
    with pytest.raises(ValueError, match="adds its own residual"):
        apply_tgate(block, TGateConfig())


# --- in the sampler --------------------------------------------------------------------------


def _sample(models, hooks, cfg_scale=3.0, n=3, steps=10, sampler="ddim"):
    gens = sample_generators(0, range(n), "cpu")
    noise = initial_noise(gens, (4, 8, 8), "cpu")
    y = torch.arange(n) % 10
    return sample(models, build_solver(sampler, steps, learned_variance=True), noise, {"y": y},
                  {"y": torch.full_like(y, 10)}, cfg_scale=cfg_scale, guided_channels=3, hooks=hooks,
                  generators=gens, progress=False)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_gate_off_sampling_is_bitwise_plain_and_detach_restores(sampler):
    model, _ = native_dit()
    plain = _sample([model], [], sampler=sampler).latents
    hook = TGateHook(gate_step=11, sp_interval=1, fi_interval=1, warm_up=0, branch="cond")
    hook.attach([model], ["dit"], None)
    off = _sample([model], [hook], sampler=sampler)
    hook.detach()
    assert torch.equal(off.latents, plain) and off.evals_per_model == [20]
    assert torch.equal(_sample([model], [], sampler=sampler).latents, plain) and not is_gated(model)
    gate = TGateHook(gate_step=6, sp_interval=2, fi_interval=1, warm_up=1, branch="cond")
    gate.attach([model], ["dit"], None)
    gated = _sample([model], [gate], sampler=sampler).latents
    gate.detach()
    assert not torch.allclose(gated, plain, rtol=1e-4, atol=0)  # the test can fail


@pytest.mark.parametrize("branch,labels", [("cond", [0, 1, 2]), ("uncond", [10, 10, 10])])
def test_guidance_stops_at_the_gate_step_and_the_chosen_branch_runs(branch, labels):
    model, _ = native_dit()
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0].shape[0], kw["y"].tolist())),
                                    with_kwargs=True)
    hook = TGateHook(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1, branch=branch)
    hook.attach([model], ["dit"], None)
    result = _sample([model], [hook])
    assert calls == [(6, [0, 1, 2, 10, 10, 10])] * 4 + [(3, labels)] * 6
    assert result.evals_per_model == [4 * 2 + 6]
    gated = result.latents
    hook.detach()
    assert not torch.equal(gated, _sample([model], []).latents)


def test_lcm_with_a_cfg_batch_is_refused_before_the_first_step():
    model, _ = native_dit()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    hook = TGateHook(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0, lcm=True)
    hook.attach([model], ["dit"], None)
    with pytest.raises(ValueError, match="lcm=true, but this run uses classifier-free guidance"):
        _sample([model], [hook], cfg_scale=3.0)
    assert calls == []
    assert _sample([model], [hook], cfg_scale=1.0).evals_per_model == [10]
    with pytest.raises(ValueError, match="lcm=true, but this run uses classifier-free guidance"):
        TGateHook(lcm=True, cfg_scale=4.0)  # known from the config: refused before any model is built


def test_with_tstitch_a_model_without_a_cache_computes_then_reuses():
    """The large model first runs at step 7, a self-attention reuse step: it computes and
    caches; at step 8 it reuses that; step 9 (9 % 3 == 0) recomputes."""
    small, _ = native_dit(seed=1)
    large, _ = native_dit(seed=2, depth=3, hidden_size=48, num_heads=3)
    qkv_steps = {"small": [], "large": []}
    step = {"i": -1}
    for name, model in (("small", small), ("large", large)):
        model.blocks[0].attn.qkv.register_forward_hook(lambda *a, n=name: qkv_steps[n].append(step["i"]))
    tgate = TGateHook(gate_step=4, sp_interval=2, fi_interval=3, warm_up=1, branch="cond")
    stitch = TStitchHook(ratio=0.7)

    class Tracker:  # records the step index for the qkv hooks above
        def start(self, plan): pass
        def step(self, ctx): step.__setitem__("i", ctx.i)
        def end(self): pass

    tgate.attach([small, large], ["small", "large"], None)
    result = _sample([small, large], [stitch, tgate, Tracker()])
    tgate.detach()
    assert result.steps_per_model == [7, 3] and result.evals_per_model == [4 * 2 + 3, 3]
    # small: 0, 1 (warm-up cache), 2 (2 % 2), 3 (g-1: CFG means), 6 (6 % 3); 4, 5 reused
    assert qkv_steps["small"] == [0, 1, 2, 3, 6]
    assert qkv_steps["large"] == [7, 9]


def test_parity_with_the_reference_tgate_package_on_a_tiny_unet(tgate_reference):
    """Our hooks vs tgate 1.0.0's own processor and scheduler, step by step, on one UNet."""
    import copy

    ref = importlib.import_module("tgate_reference.tgate_utils")
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tgate_tiny import unet

    model, call = unet()
    model.set_attn_processor(AttnProcessor2_0())  # the processor the reference re-implements
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    differs_from_plain = []
    settings = dict(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    state = apply_tgate(model, TGateConfig(**settings))
    state.start(use_cfg=True)
    with torch.no_grad():
        for s, x in enumerate(_step_inputs()):
            ca, sa, keep_shape = ref.tgate_scheduler(cur_step=s, **settings)
            ref.register_forward(reference, "Attention", ca_kward=ca, sa_kward=sa, keep_shape=keep_shape)
            rows = 2 if state.step(s).guidance else 1
            # the reference's batch is [uncond; cond]: the mean is symmetric, and rows=1 is uncond
            ours = call(model, rows, x)
            torch.testing.assert_close(ours, call(reference, rows, x), rtol=0, atol=0)
            differs_from_plain.append(not torch.allclose(ours, call(plain, rows, x), rtol=1e-4, atol=0))
    assert sum(differs_from_plain) >= 3, differs_from_plain  # reuse steps change the output: the parity can fail
