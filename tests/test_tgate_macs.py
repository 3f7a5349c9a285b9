"""The MACs counter: real module code, real gating hooks, on meta; checked step by step."""
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from diffusion.attention import find_attention
from runs.count_macs import count_config, count_run, denoiser_inputs
from tgate import Action, TGateConfig, TGateHook

from conftest import CONFIGS, compose_config
from tgate_tiny import native_dit, pixart, unet

ROOT = CONFIGS.parent
SETTINGS = dict(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)


def _meta(model):
    return model.to("meta")


def _per_module_macs(model, model_cfg):
    """MACs per batch row of the whole model and of each attention module, from one plain forward."""
    args, kwargs = denoiser_inputs(model, model_cfg, 1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values()) // 2
    prefix = type(model).__name__
    attention = {name: sum(counts[f"{prefix}.{name}"].values()) // 2 for name, _ in find_attention(model)}
    return total, attention


@pytest.mark.parametrize("make,model_cfg", [
    (native_dit, {"image_size": 64, "name": "dit"}),
    (unet, {"image_size": 64, "name": "unet", "text_length": 5}),
    (pixart, {"image_size": 64, "name": "pixart", "text_length": 6}),
])
def test_counts_match_the_schedule_step_by_step(make, model_cfg):
    model_cfg = OmegaConf.create(model_cfg)
    model = _meta(make()[0])
    total, attention = _per_module_macs(model, model_cfg)
    cross = {name: m.is_cross_attention for name, m in find_attention(model)}
    n = 9
    baseline = count_run([model], [model_cfg], n, use_cfg=True)
    assert baseline["macs_all"] == n * 2 * total and baseline["forwards_counted"] == 1
    hook = TGateHook(**SETTINGS)
    hook.attach([model], ["m"], None)
    gated = count_run([model], [model_cfg], n, use_cfg=True, hooks=[hook])
    hook.detach()
    config = TGateConfig(**SETTINGS)
    for s, step in enumerate(gated["per_step"]):
        actions = config.actions(s)
        rows = 2 if actions.guidance else 1
        reused = sum(macs for name, macs in attention.items()
                     if (actions.cross_attn if cross[name] else actions.self_attn) is Action.REUSE)
        assert (step["rows"], step["macs_all"]) == (rows, rows * (total - reused)), s
    assert gated["forwards_counted"] < n  # repeated steps were not run again
    assert gated["macs_paper"] < gated["macs_all"]  # the attention matmuls are left out of "paper"


def test_paper_convention_leaves_out_exactly_the_attention_matmuls():
    model_cfg = OmegaConf.create({"image_size": 64, "name": "dit"})
    model = _meta(native_dit(depth=1)[0])
    result = count_run([model], [model_cfg], 1, use_cfg=False)["per_step"][0]
    tokens, dim = (64 // 8 // 2) ** 2, 32  # 16 tokens of width 32
    assert result["macs_all"] - result["macs_paper"] == 2 * tokens * tokens * dim  # QK^T and AV


def test_count_macs_script_writes_macs_json(tmp_path):
    cmd = [sys.executable, "scripts/count_macs.py", "model=dit_s2", "model.image_size=32", "accel=tgate",
           "sampler.steps=6", "accel.tgate.gate_step=3", "accel.tgate.warm_up=0", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    macs = json.loads((tmp_path / "macs.json").read_text())
    assert set(macs) == {"baseline", "accelerated"}
    assert set(macs["baseline"]) == {"macs_paper", "macs_all"}
    assert 0 < macs["accelerated"]["macs_all"] < macs["baseline"]["macs_all"]
    assert "baseline" in proc.stdout and "accelerated" in proc.stdout


def _compose_macs(*overrides):
    return compose_config("macs", *overrides)


def test_bad_settings_fail_in_the_counter_too():
    with pytest.raises(ValueError, match=r"^accel\.tgate\.gate_step=0: must be an integer >= 1"):
        count_config(_compose_macs("accel.tgate.gate_step=0"))
    with pytest.raises(ValueError, match=r"lcm=true, but this run uses classifier-free guidance"):
        count_config(_compose_macs("model=sdxl_lcm", "accel=tgate"))


# The T-GATE README's MACs table (MACs for one image, CFG included), all 12 rows: the model alone and
# with the technique, each with the exact scripts/count_macs.py overrides the README shows. DeepCache
# at T-GATE's DeepCache release settings (its DeepCache/generate.py): interval 3, the DeepCache
# pipeline's cache_layer_id 0 / cache_block_id 0 (the helper's cache_branch_id 1), 25 steps; with
# T-GATE the cross-attention cached at step interval_seq[gate_idx=4] = 12: our gate_step 13.
README = {
    "sdxl": (["model=sdxl", "accel=tgate"], 149.438, 95.988),
    "pixart_alpha": (["model=pixart_alpha", "accel=tgate"], 107.031, 73.971),
    "pixart_sigma": (["model=pixart_sigma", "accel=tgate"], 107.766, 74.420),
    "deep_cache": (["model=sdxl", "accel=deep_cache", "accel.deep_cache.cache_branch_id=1"], 149.438, 57.888),
    "deep_cache_tgate": (["model=sdxl", "accel=[tgate,deep_cache]", "accel.deep_cache.cache_branch_id=1",
                          "accel.tgate.gate_step=13", "accel.tgate.sp_interval=1", "accel.tgate.warm_up=0",
                          "accel.tgate.branch=uncond"], 149.438, 43.868),
    "lcm_sdxl": (["model=sdxl_lcm", "accel=tgate", "sampler.steps=4", "sampler.cfg_scale=1"], 11.955, 11.171),
    "lcm_pixart_alpha": (["model=lcm_pixart_alpha", "accel=tgate", "sampler.steps=4", "sampler.cfg_scale=1"],
                         8.563, 7.623),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(README))
def test_full_size_counts_reproduce_the_tgate_readme(name):
    """Full-size models on meta (2 to 14 s each on 2 CPU cores, SD-XL the longest; ~45 s for all)."""
    overrides, base, accelerated = README[name]
    result = count_config(_compose_macs(*overrides))
    assert result["baseline"]["macs_paper"] / 1e12 == pytest.approx(base, rel=0.005)
    assert result["accelerated"]["macs_paper"] / 1e12 == pytest.approx(accelerated, rel=0.005)


def test_every_readme_row_is_in_the_readme_with_its_command():
    """The MACs table (docs/tgate.md, moved there from the README) shows each row's paper value and its command."""
    readme = (ROOT / "docs" / "tgate.md").read_text()
    for overrides, base, accelerated in README.values():
        command = "python scripts/count_macs.py " + " ".join(overrides)
        assert command in readme, command
        assert f"{accelerated:.3f}T" in readme and f"{base:.3f}T" in readme
