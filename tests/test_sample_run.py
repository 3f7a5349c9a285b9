"""scripts/sample.py end to end on tiny settings: files, determinism, batching, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.solvers import NoiseSchedule, build_solver
from runs.run import build_denoiser, build_hooks, call_target, check_config, model_configs, run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
# DiT-S/2 at 32x32 pixels (4x4 latent: 4 tokens), 5 steps: a run takes about a second
TINY = ["model=dit_s2", "model.image_size=32", "num_samples=4", "sampler.steps=5", "progress=false"]


def _tiny(tiny_vae_dir, *extra):
    return TINY + [f"vae.source={tiny_vae_dir}", "pretrained=false"] + list(extra)


def _run(compose_sample, tiny_vae_dir, out_dir, *extra):
    # pretrained=false makes both model and VAE random; point the random VAE at the tiny architecture
    cfg = compose_sample(*_tiny(tiny_vae_dir, *extra))
    cfg.vae.arch = OmegaConf.create({**OmegaConf.to_container(cfg.vae.arch), **_tiny_arch()})
    return run_from_config(cfg, out_dir)


def _tiny_arch():
    from conftest import TINY_VAE

    return {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_VAE.items()}


def _files(folder: Path):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml")))
def test_every_experiment_composes_and_instantiates(compose_sample, exp):
    cfg = compose_sample(f"+exp={exp}")
    if cfg.model.get("kind") == "pipeline":  # diffusers pipelines: every check that needs no download
        from runs.count_macs import build_meta_denoiser
        from runs.pipeline_run import check_pipeline_config

        check_pipeline_config(cfg)  # prompts, call settings, accel.pipeline entries built and checked
        # the architecture scripts/count_macs.py counts: 4 latent channels (SD, SD-XL, PixArt), 16 (SD3.5),
        # 16 packed in 2x2 patches (FLUX.1)
        model = build_meta_denoiser(cfg.model)
        assert model.config.in_channels == {"SD3Transformer2DModel": 16, "FluxTransformer2DModel": 64}.get(
            type(model).__name__, 4)
        return
    check_config(cfg)
    build_solver(cfg.sampler.name, cfg.sampler.steps, NoiseSchedule(**cfg.schedule),
                 learned_variance=cfg.model.get("learn_sigma", False), eta=cfg.sampler.get("eta", 0.0),
                 spacing=cfg.sampler.get("spacing"))
    build_hooks(cfg)
    with torch.device("meta"):  # full-size models, no memory or init time
        if cfg.vae.get("_target_"):  # an LDM's own first stage
            stage = call_target(cfg.vae, pretrained=False, device="meta")
            channels, factor = stage.latent_channels, stage.factor
        elif cfg.vae.source is None:
            channels, factor = cfg.vae.channels, 1
        else:
            vae = instantiate({"_target_": "diffusers.AutoencoderKL", **OmegaConf.to_container(cfg.vae.arch)})
            channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
        models = [build_denoiser(c, cfg.model.image_size // factor, pretrained=False, device="meta")
                  for c in model_configs(cfg)]
    assert all(m.in_channels == channels for m in models)


def test_dit_xl2_experiment_is_the_official_sample_command(compose_sample):
    cfg = compose_sample("+exp=dit_xl2")
    assert (cfg.model.name, cfg.model.image_size, cfg.sampler.name, cfg.sampler.steps, cfg.sampler.cfg_scale) == (
        "DiT-XL/2", 256, "ddpm", 250, 4.0)
    assert list(cfg.labels) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert cfg.vae.source == "stabilityai/sd-vae-ft-mse" and cfg.model.guided_channels == 3


def test_run_writes_the_outputs(compose_sample, tiny_vae_dir, tmp_path):
    metrics = _run(compose_sample, tiny_vae_dir, tmp_path)
    assert _files(tmp_path) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                "done", "grid.png", "metrics.json", "samples.npz", "samples_config.json"]
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].shape == (4, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].shape == (4,)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["num_images"] == metrics["num_generated"] == 4 and metrics["steps"] == 5
    assert metrics["steps_per_model"] == {"DiT-S/2": 5}
    assert metrics["sampling_seconds"] > 0 and metrics["images_per_second"] > 0


def _assert_same_up_to_rounding(a, b):
    """Equal images, up to float rounding: batched kernels (GEMM, conv) sum in a
    batch-size-dependent order (~5e-6 apart here), which can flip a rare pixel by 1."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_same_seed_same_images_and_batch_size_does_not_matter(compose_sample, tiny_vae_dir, tmp_path):
    _run(compose_sample, tiny_vae_dir, tmp_path / "a", "batch_size=4")
    _run(compose_sample, tiny_vae_dir, tmp_path / "b", "batch_size=4")
    _run(compose_sample, tiny_vae_dir, tmp_path / "c", "batch_size=1")
    _run(compose_sample, tiny_vae_dir, tmp_path / "d", "batch_size=4", "seed=1")
    a, b, c, d = (np.load(tmp_path / x / "samples.npz") for x in "abcd")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # same run twice: bit for bit
    for k in range(4):
        assert (tmp_path / "a" / f"{k:06d}.png").read_bytes() == (tmp_path / "b" / f"{k:06d}.png").read_bytes()
    _assert_same_up_to_rounding(a["arr_0"], c["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], c["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - d["arr_0"].astype(int)).mean() > 5  # another seed: other images


@pytest.mark.parametrize("override,message", [
    ("model.name=DiT-Q/2", r"unknown DiT model 'DiT-Q/2'; allowed names: DiT-XL/2, .*DiT-S/8"),
    ("sampler.steps=0", r"sampler.steps=0: must be an integer >= 1"),
    ("sampler.cfg_scale=-1", r"cfg_scale=-1(\.0)?: must be a finite number >= 0"),
    ("sampler.cfg_scale=nan", r"cfg_scale=nan: must be a finite number >= 0"),
    ("num_samples=0", r"num_samples=0: must be an integer >= 1"),
    ("labels=[1,1000]", r"labels=\[1, 1000\]: each must be a class index in \[0, 999\]"),
    ("sampler=plms", None),
])
def test_bad_input_is_refused_and_nothing_is_written(compose_sample, tiny_vae_dir, tmp_path, override, message):
    if message is None:  # an unknown config option is Hydra's own error, at compose time
        with pytest.raises(Exception, match="plms"):
            compose_sample(*_tiny(tiny_vae_dir, override))
        return
    with pytest.raises(ValueError, match=message):
        _run(compose_sample, tiny_vae_dir, tmp_path / "out", override)
    assert _files(tmp_path / "out") == []


def test_pixel_space_run(compose_sample, tmp_path):
    """vae=none: the model denoises 1-channel images directly; PNGs are grey RGB."""
    cfg = compose_sample("model=dit_s2", "model.image_size=8", "+model.in_channels=1", "model.num_classes=10",
                         "vae=none", "vae.channels=1", "pretrained=false", "num_samples=3", "sampler.steps=3",
                         "progress=false")
    with pytest.raises(ValueError, match=r"model.guided_channels=3: must be in \[1, 1\]"):
        run_from_config(cfg, tmp_path)  # DiT's 3-of-4-channel quirk cannot apply to one channel
    cfg.model.guided_channels = None
    run_from_config(cfg, tmp_path)
    images = np.load(tmp_path / "samples.npz")["arr_0"]
    assert images.shape == (3, 8, 8, 3)
    assert (images[..., 0] == images[..., 2]).all()


def test_checkpoint_of_the_wrong_model_is_refused(compose_sample, tiny_vae_dir, tmp_path):
    from dit import DiT_models

    ckpt = tmp_path / "dit_s8.pt"
    torch.save(DiT_models["DiT-S/8"](input_size=8).state_dict(), ckpt)
    cfg = compose_sample(*TINY, f"vae.source={tiny_vae_dir}", "pretrained=true", f"model.ckpt={ckpt}")
    with pytest.raises(ValueError, match=r"dit_s8.pt: does not match the model") as err:
        run_from_config(cfg, tmp_path / "out")
    for key in ("x_embedder.proj.weight: checkpoint (384, 4, 8, 8) vs model (384, 4, 2, 2)",
                "final_layer.linear.weight: checkpoint (512, 384) vs model (32, 384)"):
        assert key in str(err.value)
    assert _files(tmp_path / "out") == []


def test_missing_vae_offline_is_a_clear_error(compose_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    cfg = compose_sample(*TINY, "pretrained=true", "vae=ema")
    with pytest.raises(FileNotFoundError, match=r"cannot load the VAE 'stabilityai/sd-vae-ft-ema'.*HF_HUB_OFFLINE=1"):
        run_from_config(cfg, tmp_path / "out")
    assert _files(tmp_path / "out") == []


# slow (a script run); in the default run tests/test_refusals.py runs scripts/sample.py to completion (in
# one Python with other cases) and interrupts a real one
@pytest.mark.slow
def test_script_runs_from_the_command_line(tiny_vae_dir, tmp_path):
    """The thin script itself, in a subprocess, as a user runs it (tiny model and VAE)."""
    arch = _tiny_arch()
    overrides = [f"vae.arch.{k}={json.dumps(v).replace(' ', '')}" for k, v in arch.items()]
    cmd = [sys.executable, "scripts/sample.py", *_tiny(tiny_vae_dir), *overrides, f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"000003.png", "grid.png", "samples.npz", "metrics.json"} <= set(_files(tmp_path))


@pytest.mark.slow
def test_readme_smoke_command(tmp_path):
    """The README's command exactly: DiT-S/2 at 256 with the full-size random VAE (~40 s on 2 CPU cores)."""
    cmd = [sys.executable, "scripts/sample.py", "model=dit_s2", "pretrained=false", "num_samples=4",
           "sampler.steps=5", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (4, 256, 256, 3)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps_per_model"] == {"DiT-S/2": 5} and metrics["num_images"] == 4
