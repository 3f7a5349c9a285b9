"""accel=tgate and accel=[tstitch,tgate] through scripts/sample.py's run; configs; bad input."""
import json

import pytest

from runs.run import build_hooks, run_from_config
from tgate import TGateHook

from conftest import CONFIGS

# DiT-S/2 at 32x32 pixels (4 tokens), random weights and a tiny random VAE, 6 steps
TINY = ["model=dit_s2", "model.image_size=32", "num_samples=2", "batch_size=2", "sampler.steps=6",
        "progress=false", "pretrained=false", "vae.arch.block_out_channels=[8,8,8,8]",
        "vae.arch.norm_num_groups=8", "vae.arch.layers_per_block=1"]
# T-Stitch's partner for a model whose family has none: another DiT-S/2 (random weights) at the same size
PARTNER = ["+model@family.stitch.small=dit_s2", "family.stitch.small.image_size=${model.image_size}"]
GATE = ["accel.tgate.gate_step=3", "accel.tgate.sp_interval=2", "accel.tgate.warm_up=0", "accel.tgate.fi_interval=2"]


# model -> T-GATE's family setting (configs/family/<model>.yaml): (gate_step, sp_interval, warm_up, lcm, branch)
FAMILY_GATES = {"dit_xl2": (15, 3, 2, False, "cond"), "digits_l": (15, 3, 2, False, "cond"),
                "sdxl": (10, 5, 2, False, "uncond"), "sd15": (10, 5, 2, False, "uncond"),  # the reference's: uncond
                "pixart_alpha": (15, 3, 2, False, "uncond"), "sdxl_lcm": (1, 1, 0, True, "uncond"),
                "sd35_large": (10, 3, 2, False, "cond")}


@pytest.mark.parametrize("model", sorted(FAMILY_GATES))
@pytest.mark.parametrize("accel", ["tgate", "[tgate,deep_cache]", "[tstitch,tgate]"])
def test_tgate_takes_its_settings_from_the_model_family(compose_sample, model, accel):
    extra = ["sampler.cfg_scale=1"] if model == "sdxl_lcm" else []
    cfg = compose_sample(f"model={model}", f"accel={accel}", *extra)
    gate = [h for h in build_hooks(cfg) if isinstance(h, TGateHook)]
    assert len(gate) == 1
    c = gate[0].config
    assert (c.gate_step, c.sp_interval, c.warm_up, c.lcm, c.branch) == FAMILY_GATES[model]
    assert c.cache_attention == (model != "sd35_large")  # MM-DiT: guidance truncation alone


def test_tgate_run_writes_steps_and_gated_macs(compose_sample, tmp_path):
    plain = run_from_config(compose_sample(*TINY), tmp_path / "plain")
    gated = run_from_config(compose_sample(*TINY, "accel=tgate", *GATE), tmp_path / "gated")
    assert json.loads((tmp_path / "gated" / "metrics.json").read_text()) == gated
    assert gated["accel"] == "tgate" and gated["steps"] == 6 and gated["steps_per_model"] == {"DiT-S/2": 6}
    per_forward = plain["macs_per_forward"]["DiT-S/2"]
    assert plain["macs_per_image"] == 6 * 2 * per_forward
    # 3 guided steps (2 rows), 3 single-branch steps, and self-attention reused at some steps
    assert gated["macs_per_image"] < (3 * 2 + 3) * per_forward
    assert gated["macs_per_image"] > 0


def test_gate_off_run_gives_the_plain_images(compose_sample, tmp_path, run_latents):
    import numpy as np
    import torch

    run_from_config(compose_sample(*TINY), tmp_path / "plain")
    off = ["accel=tgate", "accel.tgate.gate_step=7", "accel.tgate.sp_interval=1", "accel.tgate.warm_up=0"]
    run_from_config(compose_sample(*TINY, *off), tmp_path / "off")
    a, b = (np.load(tmp_path / x / "samples.npz")["arr_0"] for x in ("plain", "off"))
    np.testing.assert_array_equal(a, b)
    assert torch.equal(run_latents(tmp_path / "off"), run_latents(tmp_path / "plain"))
    # guidance dropped at the last step only (gate_step 5 of 6) already changes the latents: the test can fail
    last = ["accel=tgate", "accel.tgate.gate_step=5", "accel.tgate.sp_interval=1", "accel.tgate.warm_up=0"]
    run_from_config(compose_sample(*TINY, *last), tmp_path / "last")
    plain, gated = run_latents(tmp_path / "plain"), run_latents(tmp_path / "last")
    assert plain.abs().max() > 0 and (gated - plain).abs().max() > 1e-3


def test_tstitch_tgate_run(compose_sample, tmp_path, run_latents):
    cfg = compose_sample(*TINY, *PARTNER, "accel=[tgate,tstitch]", *GATE, "accel.tstitch.ratio=0.5")
    assert [type(h).__name__ for h in build_hooks(cfg)] == ["TStitchHook", "TGateHook"]  # the order of ORDER
    metrics = run_from_config(cfg, tmp_path / "both")
    assert metrics["steps_per_model"] == {"DiT-S/2": 3, "DiT-S/2#2": 3}
    assert metrics["accel"] == "tstitch+tgate" and metrics["macs_per_image"] > 0
    # the two DiT-S/2 are two random models, and gating acts on them: each part changes the latents
    run_from_config(compose_sample(*TINY, *PARTNER, "accel=tstitch", "accel.tstitch.ratio=0.5"), tmp_path / "stitch")
    run_from_config(compose_sample(*TINY, "accel=tgate", *GATE), tmp_path / "gate")
    both, stitch, gate = (run_latents(tmp_path / k) for k in ("both", "stitch", "gate"))
    assert both.abs().max() > 0
    assert (both - stitch).norm() > 1e-3 * both.norm() and (both - gate).norm() > 1e-3 * both.norm()


@pytest.mark.parametrize("override,message", [
    ("accel.tgate.gate_step=0", r"^accel\.tgate\.gate_step=0: must be an integer >= 1"),
    ("accel.tgate.sp_interval=0", r"^accel\.tgate\.sp_interval=0: must be an integer >= 1"),
    ("accel.tgate.fi_interval=-1", r"^accel\.tgate\.fi_interval=-1: must be an integer >= 1"),
    ("accel.tgate.warm_up=-1", r"^accel\.tgate\.warm_up=-1: must be an integer >= 0"),
    ("accel.tgate.lcm=true", r"lcm=true, but this run uses classifier-free guidance"),
    ("accel.tgate.branch=both", r"^accel\.tgate\.branch='both'"),
])
def test_bad_settings_fail_before_models_are_built(compose_sample, tmp_path, override, message):
    cfg = compose_sample(*TINY, "accel=tgate", override, "model.name=DiT-Q/9")  # an unknown model would fail later
    with pytest.raises(ValueError, match=message):
        run_from_config(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["sdxl", "sdxl_lcm", "lcm_sdxl", "sd15", "sd21", "pixart_alpha", "pixart_sigma",
                                   "svd"])
def test_pipeline_models_need_the_pipeline_sampler(compose_sample, tmp_path, model):
    # the count_macs architecture configs are diffusers pipelines now (runs/pipeline_run.py)
    cfg = compose_sample(f"model={model}")
    with pytest.raises(ValueError,
                       match=r"is a diffusers pipeline, sampled with its own scheduler: use sampler=pipeline"):
        run_from_config(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gate_past_the_last_step_still_reuses_self_attention(compose_sample, tmp_path):
    """gate_step >= steps (item 5 of issue 18): no gate and no guidance truncation, but self-attention
    reused per sp_interval as in tgate 1.0.0 (tests/tgate_parity.py's sd_gate_past_end pins that on
    the reference itself); sp_interval=1 warm_up=0 is the plain run. On the trained digits pair
    (non-zero weights, so that a difference can show)."""
    import numpy as np

    from tgate import gate_table

    root = CONFIGS.parent
    digits = ["+exp=digits_stitch_0.4", "sampler.steps=6", "num_samples=4", "batch_size=4", "progress=false",
              "num_threads=1", f"model.ckpt={root / 'checkpoints/digits/digits_l.pt'}",
              f"family.stitch.small.ckpt={root / 'checkpoints/digits/digits_s.pt'}"]
    past = ["accel=[tstitch,tgate]", "accel.tgate.gate_step=99", "accel.tgate.sp_interval=3",
            "accel.tgate.warm_up=1"]
    runs = {name: run_from_config(compose_sample(*digits, *extra), tmp_path / name) for name, extra in (
        ("plain", []), ("past", past), ("off", [*past, "accel.tgate.sp_interval=1", "accel.tgate.warm_up=0"]))}
    images = {name: np.load(tmp_path / name / "samples.npz")["arr_0"] for name in runs}
    table = gate_table(6, gate_step=99, sp_interval=3, fi_interval=1, warm_up=1)
    assert all(a.guidance and a.cross_attn == "compute" for a in table)  # no gate, no truncation
    assert [a.self_attn.value for a in table] == ["compute", "compute_and_cache", "reuse", "compute_and_cache",
                                                  "reuse", "reuse"]
    assert np.abs(images["past"].astype(int) - images["plain"].astype(int)).max() > 0  # reuse changes the images
    assert runs["past"]["macs_per_image"] < runs["plain"]["macs_per_image"]           # ... and saves work
    np.testing.assert_array_equal(images["off"], images["plain"])
    assert runs["off"]["macs_per_image"] == runs["plain"]["macs_per_image"]
