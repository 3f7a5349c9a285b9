"""SD3.5 / FLUX.1 through the configs: `+exp=sd35_stitch_0.4` / `+exp=flux_stitch_0.4` sampled with tiny saved
pipeline folders (stitched, with truncation, and with accel=none), and scripts/count_macs.py counting the
plain, stitched and truncated runs step by step (checked against forwards counted here on meta models)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from runs.count_macs import count_config
from runs.run import run_from_config

import tiny_mmdit as m
from conftest import CONFIGS, compose_config

ROOT = CONFIGS.parent
PROMPTS = ["a red fox", "a blue car"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny saved pipelines: SD3 "large" and "small" (Medium-like), FLUX "dev" and "lite"."""
    root = tmp_path_factory.mktemp("mmdit")
    m.sd3_pipeline(seed=0).save_pretrained(root / "sd3_large")
    small = m.sd3_transformer(seed=7, num_layers=1, head_dim=4, dual_attention_layers=(0,))
    m.sd3_pipeline(seed=0, transformer=small).save_pretrained(root / "sd3_small")
    m.flux_pipeline(seed=0).save_pretrained(root / "flux_dev")
    m.flux_pipeline(seed=0, transformer=m.flux_transformer(seed=7, num_layers=1)).save_pretrained(root / "flux_lite")
    return root


def _tiny(folders, exp, large, small, *extra):
    """The experiment on tiny saved pipelines; small=None for accels without a small model (accel=none)."""
    small = [f"family.stitch.small.source={folders / small}"] if small is not None else []
    return [f"+exp={exp}", f"model.source={folders / large}", *small, "model.dtype=float32", "model.image_size=16",
            "sampler.steps=5", "num_samples=3", "batch_size=2",
            f"prompts={json.dumps(PROMPTS)}", "progress=false", "num_threads=1", "device=cpu", *extra]


def _pngs(folder, n=3):
    from PIL import Image

    return [np.asarray(Image.open(folder / f"{k:06d}.png")) for k in range(n)]


def _direct(pipe, k, steps=5, scale=3.5, **kwargs):
    """Sample k as the stock pipeline makes it alone: prompt k % 2, generator seed k."""
    out = pipe(PROMPTS[k % 2], num_inference_steps=steps, guidance_scale=scale, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(k), **kwargs).images[0]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("exp, large, small, cls", [
    ("sd35_stitch_0.4", "sd3_large", "sd3_small", "StableDiffusion3Pipeline"),
    ("flux_stitch_0.4", "flux_dev", "flux_lite", "FluxPipeline"),
])
def test_experiment_samples_stitched_and_with_accel_none(compose_sample, folders, tmp_path, exp, large, small, cls):
    import diffusers

    metrics = run_from_config(compose_sample(*_tiny(folders, exp, large, small)), tmp_path / "stitched")
    # 5 steps, 40%: round(2.0) = 2 on the small model
    assert list(metrics["steps_per_model"].values()) == [2, 3] and metrics["pipeline"] == cls
    plain = run_from_config(compose_sample(*_tiny(folders, exp, large, None, "accel=none")), tmp_path / "plain")
    assert plain["steps_per_model"] is None
    pipe = getattr(diffusers, cls).from_pretrained(folders / large)
    pipe.set_progress_bar_config(disable=True)
    stitched = _pngs(tmp_path / "stitched")
    for k, image in enumerate(_pngs(tmp_path / "plain")):
        assert np.array_equal(image, _direct(pipe, k)), k  # accel=none is the stock pipeline, sample by sample
    assert not all(np.array_equal(a, b) for a, b in zip(stitched, _pngs(tmp_path / "plain"), strict=True))


def test_sd35_stitched_with_truncation_through_the_configs(compose_sample, folders, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from tgate import TGateConfig, apply_tgate
    from tstitch import stitch_pipeline

    extra = ["accel=[tstitch,tgate]", "accel.tgate.gate_step=3"]
    metrics = run_from_config(compose_sample(*_tiny(folders, "sd35_stitch_0.4", "sd3_large", "sd3_small", *extra)),
                              tmp_path / "both")
    assert metrics["accel"] == "tstitch+tgate" and list(metrics["steps_per_model"].values()) == [2, 3]
    pipe = StableDiffusion3Pipeline.from_pretrained(folders / "sd3_large")
    pipe.set_progress_bar_config(disable=True)
    stitch_pipeline(pipe, str(folders / "sd3_small"), ratio=0.4)
    stitched = [_direct(pipe, k) for k in range(3)]
    apply_tgate(pipe, TGateConfig(gate_step=3, cache_attention=False, branch="cond"))
    for k, image in enumerate(_pngs(tmp_path / "both")):
        assert np.array_equal(image, _direct(pipe, k)), k
    assert not all(np.array_equal(a, b) for a, b in zip(_pngs(tmp_path / "both"), stitched, strict=True))


def test_bad_pairs_through_the_configs_are_refused_before_sampling(compose_sample, folders, tmp_path):
    import tiny_sd

    tiny_sd.sdxl_pipeline(seed=0).save_pretrained(tmp_path / "sdxl")
    cases = [("sd35_stitch_0.4", "sd3_large", tmp_path / "sdxl", r"UNet2DConditionModel, .* is SD3Transformer2DModel"),
             ("flux_stitch_0.4", "flux_dev", folders / "sd3_small",
              r"SD3Transformer2DModel, .* is FluxTransformer2DModel \(their inputs differ too: in_channels=16 vs 64")]
    for exp, large, small, message in cases:
        with pytest.raises(ValueError, match=message):
            run_from_config(compose_sample(*_tiny(folders, exp, large, small)), tmp_path / "out")
        assert not list((tmp_path / "out").glob("*.png"))


# --- MACs ----------------------------------------------------------------------------------------------------

SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_attention_heads=2,
                attention_head_dim=8, caption_projection_dim=16, joint_attention_dim=64, pooled_projection_dim=64,
                pos_embed_max_size=16, qk_norm="rms_norm")
FLUX_TINY = dict(patch_size=1, in_channels=64, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])


def _compose_macs(*overrides):
    return compose_config("macs", *overrides)


def _shrink(cfg, large: dict, small: dict | None):
    """The composed config with tiny architectures (the counting code is the same at any size)."""
    cfg.model.arch = OmegaConf.create(large)
    cfg.model.image_size, cfg.model.text_length = 64, 6  # latent 8x8
    if small is not None:
        cfg.accel.models.small.arch = OmegaConf.create(small)
        cfg.accel.models.small.image_size, cfg.accel.models.small.text_length = 64, 6
    return cfg


def _forward_macs(model, rows: int) -> int:
    """All-ops MACs of one forward at `rows`, inputs made here from the published layouts."""
    from diffusers import FluxTransformer2DModel

    meta = dict(device="meta")
    c = model.config
    if isinstance(model, FluxTransformer2DModel):  # 8x8x16 latent -> 16 tokens of 64; 6 text tokens
        kwargs = dict(hidden_states=torch.zeros(rows, 16, 64, **meta), img_ids=torch.zeros(16, 3, **meta),
                      txt_ids=torch.zeros(6, 3, **meta), guidance=torch.zeros(rows, **meta),
                      encoder_hidden_states=torch.zeros(rows, 6, c.joint_attention_dim, **meta))
    else:
        kwargs = dict(hidden_states=torch.zeros(rows, 16, 8, 8, **meta),
                      encoder_hidden_states=torch.zeros(rows, 6, c.joint_attention_dim, **meta))
    kwargs.update(timestep=torch.zeros(rows, **meta), pooled_projections=torch.zeros(rows, c.pooled_projection_dim,
                                                                                     **meta))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**kwargs)
    return counter.get_total_flops() // 2


def _meta_model(cls_name: str, arch: dict):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**arch)


def test_count_macs_counts_sd35_plain_stitched_and_truncated_runs():
    large_arch, small_arch = {**SD3_TINY, "num_layers": 3}, {**SD3_TINY, "num_layers": 1,
                                                             "dual_attention_layers": [0]}
    large = {r: _forward_macs(_meta_model("SD3Transformer2DModel", large_arch), r) for r in (1, 2)}
    small = {r: _forward_macs(_meta_model("SD3Transformer2DModel", small_arch), r) for r in (1, 2)}
    assert small[2] < large[2] and large[2] == 2 * large[1]
    # SD3.5 Large's defaults: 28 steps, guidance 3.5 (a CFG batch of 2 rows); 40%: round(11.2) = 11 Medium steps
    result = count_config(_shrink(_compose_macs("+exp=sd35_stitch_0.4"), large_arch, small_arch))
    assert result["baseline"]["macs_all"] == 28 * large[2]
    assert [s["model_index"] for s in result["accelerated"]["per_step"]] == [0] * 11 + [1] * 17
    assert result["accelerated"]["macs_all"] == 11 * small[2] + 17 * large[2]
    # + truncation from step 10: one row (the conditional branch) from there on
    both = count_config(_shrink(_compose_macs("+exp=sd35_stitch_0.4", "accel=[tstitch,tgate]"),
                                large_arch, small_arch))
    assert [s["rows"] for s in both["accelerated"]["per_step"]] == [2] * 10 + [1] * 18
    assert both["accelerated"]["macs_all"] == 10 * small[2] + small[1] + 17 * large[1]
    truncated = count_config(_shrink(_compose_macs("model=sd35_large", "sampler=pipeline", "accel=tgate"),
                                     large_arch, None))
    assert truncated["accelerated"]["macs_all"] == 10 * large[2] + 18 * large[1]


def test_count_macs_counts_flux_without_a_cfg_batch():
    large_arch = {**FLUX_TINY, "num_layers": 3, "num_single_layers": 2}
    small_arch = {**FLUX_TINY, "num_layers": 1, "num_single_layers": 2}
    large = _forward_macs(_meta_model("FluxTransformer2DModel", large_arch), 1)
    small = _forward_macs(_meta_model("FluxTransformer2DModel", small_arch), 1)
    result = count_config(_shrink(_compose_macs("+exp=flux_stitch_0.4"), large_arch, small_arch))
    # FLUX.1-dev's defaults: 50 steps, embedded guidance (one row per step); 40% = 20 Lite steps
    assert [s["rows"] for s in result["baseline"]["per_step"]] == [1] * 50
    assert result["baseline"]["macs_all"] == 50 * large
    assert result["accelerated"]["macs_all"] == 20 * small + 30 * large
    with pytest.raises(ValueError, match="takes the guidance scale as an input|joint attention|no attention module"):
        count_config(_shrink(_compose_macs("model=flux_dev", "sampler=pipeline", "accel=tgate"), large_arch, None))


def test_count_macs_refuses_t_gate_caching_on_sd3():
    with pytest.raises(ValueError, match=r"joint attention .* accel=tgate on an MM-DiT"):
        count_config(_shrink(_compose_macs("model=sd35_large", "sampler=pipeline", "accel=tgate",
                                           "accel.tgate.cache_attention=true"),
                             {**SD3_TINY, "num_layers": 1}, None))


# full size, as the README's table (each count ~10-20 s on 2 CPU cores): (overrides, baseline T, accelerated T)
README = {
    "sd35_stitch": (["+exp=sd35_stitch_0.4"], 871.391, 652.804),
    "sd35_truncation": (["model=sd35_large", "sampler=pipeline", "accel=tgate"], 871.391, 591.301),
    "sd35_stitch_truncation": (["+exp=sd35_stitch_0.4", "accel=[tstitch,tgate]"], 871.391, 382.650),
    "flux_stitch": (["+exp=flux_stitch_0.4"], 1859.616, 1716.086),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(README))
def test_full_size_counts_are_the_readme_table(name):
    overrides, base, accelerated = README[name]
    result = count_config(_compose_macs(*overrides))
    assert result["baseline"]["macs_all"] / 1e12 == pytest.approx(base, abs=5e-4)
    assert result["accelerated"]["macs_all"] / 1e12 == pytest.approx(accelerated, abs=5e-4)


# slow (the script at full size on meta); the same counts are checked in-process above
@pytest.mark.slow
def test_count_macs_script_runs_the_stitched_experiment(tmp_path):
    # the script end to end, at full size on meta (~10 s): SD3.5 Large alone vs stitched with Medium
    cmd = [sys.executable, "scripts/count_macs.py", "+exp=sd35_stitch_0.4", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    macs = json.loads((tmp_path / "macs.json").read_text())
    assert 0 < macs["accelerated"]["macs_all"] < macs["baseline"]["macs_all"]
    assert "SD3.5-Medium -> SD3.5-Large" in proc.stdout
