"""Every experiment (configs/exp/*.yaml, globbed: experiments added later are covered) has its
baseline, `+exp=NAME accel=none`: the same model, sampler, steps, guidance, seeds and inputs with no
acceleration, which composes and samples (tiny stand-ins for the weights); and every list of techniques
(accel=[tstitch,tgate], ...) composes with it and is either accepted by the checks that run before any
model or refused in one line that says why (REFUSES: DeepCache on a DiT, no T-Stitch partner, ...)."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.solvers import NoiseSchedule, build_solver
from runs.run import build_denoiser, build_hooks, call_target, check_config, model_configs, model_names, run_from_config

import tiny_mmdit as mm
import tiny_sd as t
from conftest import CONFIGS, TINY_VAE

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml"))
ACCELS = sorted(p.stem for p in (CONFIGS / "accel").glob("*.yaml"))  # one file per technique, and none
# what an experiment's run is made of, apart from the acceleration
SAME = ("model", "vae", "sampler", "schedule", "seed", "labels", "num_samples", "batch_size", "prompts",
        "prompts_file", "negative_prompt", "images", "grid_by_label")


def test_there_are_experiments_and_accel_configs():
    assert "digits_stitch_0.4" in EXPERIMENTS and {"none", "tstitch", "tgate", "deep_cache"} <= set(ACCELS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_accel_none_is_the_same_run_without_acceleration(compose_sample, exp):
    from runs.techniques import label, stitched_models

    full, base = compose_sample(f"+exp={exp}"), compose_sample(f"+exp={exp}", "accel=none")
    assert label(base.accel) == "none"
    assert not stitched_models(base.accel) and not base.accel.hooks and not base.accel.pipeline
    for key in SAME:
        assert OmegaConf.select(base, key) == OmegaConf.select(full, key), key


# --- tiny stand-ins for each kind of model an experiment can name --------------------------------

TINY_DIT = {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}
TINY_LDM_UNET = {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [2], "num_res_blocks": 1}
TINY_PIPELINES = {  # pipeline_class -> (builder, extra call arguments)
    "diffusers.StableDiffusionPipeline": (lambda: t.sd_pipeline(0), {}),
    "diffusers.StableDiffusionXLPipeline": (lambda: t.sdxl_pipeline(0), {}),
    "diffusers.PixArtAlphaPipeline": (lambda: t.pixart_pipeline(0),
                                      {"use_resolution_binning": False, "clean_caption": False}),
    "diffusers.StableDiffusion3Pipeline": (lambda: mm.sd3_pipeline(0), {}),
    "diffusers.FluxPipeline": (lambda: mm.flux_pipeline(0), {}),
}


def _plain(node):
    return OmegaConf.to_container(node, resolve=True)


def tiny_config(compose_sample, exp: str, folder, tiny_vae_dir, *extra):
    """`+exp=exp accel=none` (plus extra) with the model (and first stage) swapped for tiny random stand-ins
    of the same kind, so that the run is seconds on a CPU; everything else is the experiment's."""
    overrides = [f"+exp={exp}", "accel=none", "progress=false", "device=cpu", "num_threads=1", *extra]
    cfg = compose_sample(*overrides)
    if cfg.model.get("kind") == "pipeline":
        cls = cfg.model.pipeline_class
        if cls not in TINY_PIPELINES:
            pytest.fail(f"experiment {exp}: no tiny stand-in for {cls}; add one to TINY_PIPELINES")
        build, call = TINY_PIPELINES[cls]
        build().save_pretrained(folder)
        cfg = compose_sample(*overrides, f"model.source={folder}", "model.image_size=16", "sampler.steps=2",
                             "num_samples=2", "batch_size=2")
        cfg.model.load, cfg.model.components = OmegaConf.create({}), OmegaConf.create({})  # no fp16 files, no hub
        cfg.model.dtype = "float32"
        cfg.model.call = OmegaConf.create({**_plain(cfg.model.call), **call})
        return cfg
    target = cfg.model._target_
    cfg = compose_sample(*overrides, "sampler.steps=2", "num_samples=2", "batch_size=2")
    if target == "dit.build_dit" and cfg.model.get("arch") is not None and cfg.model.ckpt:  # shipped weights
        return cfg
    OmegaConf.set_struct(cfg, False)  # the stand-ins add keys (a DiT's arch)
    cfg.pretrained = False
    if target == "dit.build_dit":
        cfg.model.arch = OmegaConf.create(TINY_DIT)
        cfg.model.image_size = 32
    elif target == "ldm.build_ldm":
        cfg.model.unet = OmegaConf.create({**_plain(cfg.model.unet), **TINY_LDM_UNET})
        cfg.model.image_size = 32
    else:
        pytest.fail(f"experiment {exp}: no tiny stand-in for model target {target}; add one to tiny_config")
    if cfg.vae.get("source"):  # the SD VAE: a tiny one of the same layout
        cfg.vae.source = str(tiny_vae_dir)
        cfg.vae.arch = OmegaConf.create({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_VAE.items()})
    elif cfg.vae.get("config") is not None:  # a CompVis first stage: as narrow as GroupNorm(32) allows
        cfg.vae.config.params.ddconfig.ch = 32
    return cfg


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_accel_none_baseline_samples(compose_sample, exp, tmp_path, tiny_vae_dir):
    cfg = tiny_config(compose_sample, exp, tmp_path / "pipe", tiny_vae_dir)
    metrics = run_from_config(cfg, tmp_path / "run")
    assert metrics["accel"] == "none" and metrics["num_images"] == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["accel"] == "none"
    if cfg.model.get("kind") != "pipeline":
        assert metrics["steps_per_model"] == {cfg.model.name: 2}  # the large model alone
        assert "tstitch_rule" not in metrics
    else:
        assert metrics["steps_per_model"] is None and metrics["steps"] == 2


# --- every technique list with every experiment -------------------------------------------------

TECHNIQUE_LISTS = ["none", "[]", "tstitch", "tgate", "deep_cache", "[tstitch,tgate]", "[tgate,tstitch]",
                   "[tgate,deep_cache]", "[tstitch,deep_cache]", "[tstitch,tgate,deep_cache]"]
# the techniques each experiment's model refuses, with the word its one-line refusal must hold
REFUSES = {
    "digits_fast": {"deep_cache": "DiT"}, "digits_stitch_0.4": {"deep_cache": "DiT"},
    "dit_stitch_0.4": {"deep_cache": "DiT"}, "dit_stitch_sbxl": {"deep_cache": "DiT"}, "dit_xl2": {"deep_cache": "DiT"},
    "ldm_cin256_v2": {"tstitch": "no T-Stitch partner"},  # VQ-f4: LDM-S is VQ-f8
    "ldm_stitch_0.4": {},
    "pixart_alpha_tgate": {"tstitch": "no T-Stitch partner", "deep_cache": "DiT"},
    "sd35_stitch_0.4": {"deep_cache": "MM-DiT"},
    "flux_stitch_0.4": {"tgate": "MM-DiT", "deep_cache": "MM-DiT"},  # guidance-distilled: no CFG batch to truncate
    "sd_stitch_0.3": {}, "sdxl_ssd1b_stitch_0.4": {}, "sdxl_tgate": {},
}


def test_every_experiment_has_its_refusals_listed():
    assert set(REFUSES) == set(EXPERIMENTS), "add the new experiment to REFUSES"


_meta_models: dict = {}  # built once per set of model configs (meta: no memory, no weights)


def _meta_denoisers(cfg, factor: int, channels: int):
    """The run's denoisers on `meta` (full size, no memory), built once per set of model configs."""
    configs = model_configs(cfg)
    key = json.dumps([_plain(c) for c in configs], sort_keys=True)
    if key not in _meta_models:
        with torch.device("meta"):
            _meta_models[key] = [build_denoiser(c, cfg.model.image_size // factor, pretrained=False, device="meta")
                                 for c in configs]
    models = _meta_models[key]
    for c, m in zip(configs, models, strict=True):  # as run_from_config checks once the models are built
        if getattr(m, "in_channels", channels) != channels:
            raise ValueError(f"model {c.name} takes {m.in_channels} latent channels, the VAE makes {channels}")
    return models


def checks_before_any_model(cfg):
    """What a run checks before loading weights: pipelines their call and accel entries; native runs
    the config, solver and hooks, then (on meta copies) the hooks against the models they act on."""
    if cfg.model.get("kind") == "pipeline":
        from runs.pipeline_run import check_pipeline_config

        check_pipeline_config(cfg)
        return
    check_config(cfg)
    solver = build_solver(cfg.sampler.name, cfg.sampler.steps, NoiseSchedule(**cfg.schedule),
                          learned_variance=bool(cfg.model.get("learn_sigma", False)), eta=cfg.sampler.get("eta", 0.0),
                          spacing=cfg.sampler.get("spacing"))
    hooks = build_hooks(cfg)
    if cfg.vae.get("_target_"):
        with torch.device("meta"):
            stage = call_target(cfg.vae, pretrained=False, device="meta")
        factor, channels = stage.factor, stage.latent_channels
    elif cfg.vae.get("source") is None:
        factor, channels = 1, cfg.vae.channels
    else:  # the SD VAE of vae.arch
        blocks = cfg.vae.arch.block_out_channels
        factor, channels = 2 ** (len(blocks) - 1), cfg.vae.arch.latent_channels
    models = _meta_denoisers(cfg, factor, channels)
    names = model_names(model_configs(cfg))
    try:
        for hook in hooks:
            hook.attach(models, names, solver)
    finally:
        for hook in hooks:
            hook.detach()


@pytest.mark.parametrize("exp", EXPERIMENTS)
@pytest.mark.parametrize("accel", TECHNIQUE_LISTS)
def test_every_technique_list_composes_with_every_experiment(compose_sample, exp, accel):
    from diffusion.errors import UserError
    from runs.techniques import label

    cfg = compose_sample(f"+exp={exp}", f"accel={accel}")  # never a composition error
    names = [] if accel in ("none", "[]") else accel.strip("[]").split(",")
    refused = [n for n in names if n in REFUSES[exp]]
    assert label(cfg.accel) == ("+".join(sorted(names, key=["tstitch", "tgate", "deep_cache"].index)) or "none")
    if not refused:
        checks_before_any_model(cfg)
        return
    with pytest.raises(UserError) as error:  # refused before any weights, in one line that says why
        checks_before_any_model(cfg)
    text = str(error.value)
    assert "\n" not in text and any(REFUSES[exp][n] in text for n in refused), (exp, accel, text)


def test_readme_shows_every_experiment_with_its_baseline_command():
    readme = (CONFIGS.parent / "README.md").read_text()
    for exp in EXPERIMENTS:
        assert f"python scripts/sample.py +exp={exp}`" in readme, exp
        assert f"python scripts/sample.py +exp={exp} accel=none" in readme, exp
