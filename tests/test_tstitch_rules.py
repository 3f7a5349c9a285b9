"""accel.tstitch.rule: index | timestep | floor, each against the formula of the code it reproduces.

The expected splits are computed here from the formulas themselves, on timesteps respaced here
with ADM's `space_timesteps` loop (written out again, independently of diffusion.respace); the
hook under test gets its timesteps from our DDIM solver (`sampler=ddim sampler.spacing=adm`).
"""
import json

import numpy as np
import pytest
import torch

from diffusion import SamplingPlan, StepContext
from diffusion.solvers import NoiseSchedule, build_solver
from runs.run import build_hooks, run_from_config
from tstitch import TStitchHook, models_for_steps, stitch_pipeline

import tiny_sd as t

STEPS = [10, 25, 50, 100, 250]
RATIOS = [round(0.1 * k, 1) for k in range(11)]  # as upstream's scripts make them
THREE = [[0.4, 0.2, 0.4], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.0, 0.5, 0.5]]


def adm_timesteps(n: int, T: int = 1000) -> list[int]:
    """ADM's space_timesteps(T, str(n)) for one section, as its loop computes it, in sampling order."""
    stride = (T - 1) / (n - 1) if n > 1 else 1
    taken, cur = [], 0.0
    for _ in range(n):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken), reverse=True)


def dit_two(r, t):  # NVlabs/T-Stitch dit/models.py, TStitch: model 0 while t/1000 >= 1 - r
    return 0 if t / 1000 >= (1 - r) else 1


def dit_multi(fractions, t):  # MultiTStitch: float32 cumulative fractions, first milestone >= progress
    milestones = np.cumsum(np.array(fractions, dtype=np.float32))
    progress = np.float32(1 - t / 1000)
    return next((j for j, m in enumerate(milestones) if progress <= m), len(fractions) - 1)


def ldm_two(r, t):  # ldm/models/diffusion/ddpm.py, TStitchProxy: ratio 1, or strictly t/1000 > 1 - r
    return 0 if (r == 1.0 or t / 1000 > (1 - r)) else 1


def floor_sd(r, i, n):  # tstitch_sd_utils.py, TStitchSD / TStitchSDXL
    return 0 if (i + 1) / n <= r else 1


def floor_lcm(r, i, n):  # tstitch_sd_utils.py, TStitchLCM
    if r == 0.0:
        return 1
    if r == 1.0:
        return 0
    return 0 if i / n <= r else 1


def hook_split(n, rule, ratio=None, fractions=None, timestep_form="dit"):
    """Model index per step chosen by TStitchHook on our DDIM solver with ADM respacing."""
    solver = build_solver("ddim", n, NoiseSchedule(), spacing="adm")
    _, model_steps = solver.reset()
    hook = TStitchHook(ratio=ratio, fractions=fractions, rule=rule, timestep_form=timestep_form)
    models = len(hook.fractions)
    hook.start(SamplingPlan(n, models, 1, 1.5, True, tuple(model_steps.tolist())))
    out = []
    for i, step_t in enumerate(model_steps.tolist()):
        ctx = StepContext(i=i, n=n, t=torch.full((1,), step_t), timestep=float(step_t))
        hook.step(ctx)
        out.append(ctx.model_index)
    return out


@pytest.mark.parametrize("n", STEPS)
def test_our_solver_steps_the_adm_respaced_timesteps(n):
    _, model_steps = build_solver("ddim", n, NoiseSchedule(), spacing="adm").reset()
    assert model_steps.tolist() == adm_timesteps(n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("r", RATIOS)
def test_two_model_rules_follow_upstreams_formulas(n, r):
    ts = adm_timesteps(n)
    assert hook_split(n, "timestep", ratio=r) == [dit_two(r, x) for x in ts]
    assert hook_split(n, "timestep", ratio=r, timestep_form="ldm") == [ldm_two(r, x) for x in ts]
    assert hook_split(n, "floor", ratio=r) == [floor_sd(r, i, n) for i in range(n)]
    small = round(r * n)
    assert hook_split(n, "index", ratio=r) == [0] * small + [1] * (n - small)
    assert models_for_steps([r, 1 - r], n, "floor", lcm=True) == [floor_lcm(r, i, n) for i in range(n)]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("fractions", THREE)
def test_three_model_timestep_rule_follows_multi_tstitch(n, fractions):
    ts = adm_timesteps(n)
    assert hook_split(n, "timestep", fractions=fractions) == [dit_multi(fractions, x) for x in ts]
    split = hook_split(n, "floor", fractions=fractions)
    assert split == sorted(split) and len(split) == n  # in order, no interleaving


def test_the_rules_really_differ_where_the_issue_says():
    # 25 ADM steps: t = 999, 957, 916, 874, ...; r = 0.1 -> three timesteps >= 900, round(2.5) = 2
    assert adm_timesteps(25)[:4] == [999, 957, 916, 874]
    assert hook_split(25, "timestep", ratio=0.1).count(0) == 3
    assert hook_split(25, "index", ratio=0.1).count(0) == 2
    assert hook_split(25, "floor", ratio=0.3).count(0) == 7 and hook_split(25, "index", ratio=0.3).count(0) == 8
    differ = [(n, r) for n in STEPS for r in RATIOS
              if hook_split(n, "timestep", ratio=r) != hook_split(n, "index", ratio=r)]
    assert (25, 0.1) in differ and (25, 0.5) in differ and (25, 0.7) in differ
    assert all(n != 100 for n, _ in differ)  # the paper's DDIM-100: the same split


def test_bad_rules_are_refused_before_any_model(compose_sample):
    with pytest.raises(ValueError, match=r"tstitch rule='round': must be one of index, timestep, floor"):
        TStitchHook(ratio=0.4, rule="round")
    with pytest.raises(ValueError, match=r"timestep_form='sd': must be one of dit, ldm"):
        TStitchHook(ratio=0.4, rule="timestep", timestep_form="sd")
    with pytest.raises(ValueError, match=r"^accel\.tstitch\.rule='nope': must be one of index, timestep, floor"):
        build_hooks(compose_sample("+exp=dit_stitch_0.4", "accel.tstitch.rule=nope"))


def test_configs_pick_the_form_of_the_upstream_code(compose_sample):
    dit = build_hooks(compose_sample("+exp=dit_stitch_0.4", "accel.tstitch.rule=timestep"))[0]
    ldm = build_hooks(compose_sample("+exp=ldm_stitch_0.4", "accel.tstitch.rule=timestep"))[0]
    assert (dit.rule, dit.timestep_form) == ("timestep", "dit") and (ldm.rule, ldm.timestep_form) == ("timestep", "ldm")
    assert build_hooks(compose_sample("+exp=dit_stitch_0.4"))[0].rule == "index"  # the default


def test_a_native_run_uses_the_rule_and_records_it(compose_sample, tmp_path):
    common = ["+exp=digits_stitch_0.4", "sampler.steps=25", "num_samples=2", "batch_size=2", "labels=[3,7]",
              "progress=false"]
    stitch = [*common, "accel.tstitch.ratio=0.1"]
    metrics = run_from_config(compose_sample(*stitch, "accel.tstitch.rule=timestep"), tmp_path / "t")
    assert list(metrics["steps_per_model"].values()) == [3, 22]
    assert metrics["tstitch_rule"] == "timestep" and metrics["tstitch_timestep_form"] == "dit"
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["tstitch_rule"] == "timestep"
    metrics = run_from_config(compose_sample(*stitch), tmp_path / "i")
    assert list(metrics["steps_per_model"].values()) == [2, 23] and metrics["tstitch_rule"] == "index"
    plain = run_from_config(compose_sample(*common, "accel=none"), tmp_path / "n")
    assert "tstitch_rule" not in plain


# --- stitched diffusers pipelines ---

def _stitched(rule, ratio, cls=None, scheduler="ddim", unet_kwargs=None):
    unet_kwargs = unet_kwargs or {}
    pipe = t.sd_pipeline(0, scheduler_name=scheduler, unet=t.sd_unet(0, **unet_kwargs), cls=cls)
    return stitch_pipeline(pipe, t.sd_unet(7, widths=(8, 16), **unet_kwargs), ratio=ratio, rule=rule)


def _run(pipe, n, **extra):
    with torch.no_grad():
        pipe(t.PROMPT, num_inference_steps=n, height=16, width=16, output_type="latent",
             generator=torch.Generator().manual_seed(0), **extra)
    return pipe.unet.last_steps


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("r", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
def test_stitched_pipelines_follow_upstreams_floor_rules(n, r):
    assert _run(_stitched("floor", r), n) == [floor_sd(r, i, n) for i in range(n)]
    from diffusers import LatentConsistencyModelPipeline

    lcm = _stitched("floor", r, cls=LatentConsistencyModelPipeline, scheduler="lcm",
                    unet_kwargs={"time_cond_proj_dim": 8})
    assert _run(lcm, n, guidance_scale=4.0) == [floor_lcm(r, i, n) for i in range(n)]


def test_stitched_pipeline_timestep_rule_reads_the_schedulers_timesteps():
    pipe = _stitched("timestep", 0.3)
    steps = _run(pipe, 10)
    timesteps = pipe.scheduler.timesteps.tolist()  # DDIM "leading" + offset 1: 901, 801, ...
    assert steps == [dit_two(0.3, x) for x in timesteps] and steps.count(0) == 3
    assert _run(_stitched("index", 0.25), 10).count(0) == 2 and _run(_stitched("floor", 0.25), 10).count(0) == 2


def test_stitched_pipeline_run_records_the_rule(compose_sample, tmp_path):
    folder = tmp_path / "sd"
    t.sd_pipeline(0).save_pretrained(folder)
    t.sd_unet(7, widths=(8, 16)).save_pretrained(tmp_path / "small")
    cfg = compose_sample("model=sd15", "sampler=pipeline", f"model.source={folder}", "model.image_size=16",
                         "sampler.steps=10", "num_samples=1", "batch_size=1", "prompts=[a cat]", "progress=false",
                         "device=cpu", "accel=tstitch", f"family.stitch.small.source={tmp_path / 'small'}",
                         "accel.tstitch.ratio=0.25", "accel.tstitch.rule=floor")
    metrics = run_from_config(cfg, tmp_path / "run")
    assert list(metrics["steps_per_model"].values()) == [2, 8] and metrics["tstitch_rule"] == "floor"
