"""Whole CompVis LDM checkpoints (three prefixes + yaml) loaded and sampled through scripts/sample.py."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldm import build_class_conditional_ldm, build_ldm, load_first_stage, read_compvis_config
from ldm.first_stage import first_stage_kwargs
from ldm.first_stage_convert import diffusers_to_compvis_first_stage

from ldm_tiny import TINY_COND_STAGE, TINY_UNET

REPO = Path(__file__).resolve().parents[1]
# a 2-level VQ first stage (f2, 4 latent channels, 16 codes) in CompVis first_stage_config form
TINY_VQ = {"target": "ldm.models.autoencoder.VQModelInterface",
           "params": {"embed_dim": 4, "n_embed": 16,
                      "ddconfig": {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
                                   "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                   "dropout": 0.0}}}


def compvis_params(unet=TINY_UNET, cond_stage=TINY_COND_STAGE) -> dict:
    return {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "scale_factor": 1.0,
            "conditioning_key": "crossattn", "cond_stage_key": "class_label",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": TINY_VQ, "cond_stage_config": cond_stage}


def write_compvis_ldm(folder: Path, name: str, params: dict, seed: int, ema: bool = False) -> tuple[Path, Path]:
    """A CompVis-layout .ckpt (state_dict with all three prefixes, diffusion buffers) and its yaml."""
    torch.manual_seed(seed)
    model = build_class_conditional_ldm(None, params["unet_config"]["params"], params["cond_stage_config"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    cls, kwargs = first_stage_kwargs(params["first_stage_config"])
    first_stage = cls(**kwargs)
    state = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    state |= {"cond_stage_model." + k: v for k, v in model.cond_stage_model.state_dict().items()}
    state |= {"first_stage_model." + k: v
              for k, v in diffusers_to_compvis_first_stage(first_stage.state_dict(), "vq").items()}
    state["betas"] = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2
    if ema:  # LitEma's names: the U-Net's keys under model_ema. without dots, here shifted weights
        state |= {"model_ema." + ("diffusion_model." + k).replace(".", ""): v + 1.0
                  for k, v in model.unet.state_dict().items()}
    ckpt, config = folder / f"{name}.ckpt", folder / f"{name}.yaml"
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    config.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                                "params": params}}))
    return ckpt, config


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compvis_ldm")
    large = write_compvis_ldm(folder, "ldm", compvis_params(), seed=0)
    small_unet = dict(TINY_UNET, model_channels=32, channel_mult=[1, 1])
    small = write_compvis_ldm(folder, "ldm_s", compvis_params(small_unet), seed=1)
    return large, small


def test_checkpoint_and_yaml_load_into_model_and_first_stage(tiny_pair):
    (ckpt, config), _ = tiny_pair
    model = build_ldm("tiny", pretrained=True, num_classes=10, ckpt=ckpt, compvis_config=config)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.unet.input_blocks[0][0].weight, state["model.diffusion_model.input_blocks.0.0.weight"])
    assert torch.equal(model.cond_stage_model.embedding.weight, state["cond_stage_model.embedding.weight"])
    stage = load_first_stage(ckpt=ckpt, compvis_config=config, pretrained=True)
    assert (stage.latent_channels, stage.factor) == (4, 2)
    images = stage.decode(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    eps = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 10]))  # 10 = the null class
    assert eps.shape == (2, 4, 8, 8)


def test_ema_weights_are_used_when_present(tmp_path):
    ckpt, config = write_compvis_ldm(tmp_path, "ema", compvis_params(), seed=3, ema=True)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    with_ema = build_ldm("tiny", pretrained=True, num_classes=10, ckpt=ckpt, compvis_config=config)
    plain = build_ldm("tiny", pretrained=True, num_classes=10, ckpt=ckpt, compvis_config=config, use_ema=False)
    assert torch.equal(with_ema.unet.input_blocks[0][0].weight, state[key] + 1.0)
    assert torch.equal(plain.unet.input_blocks[0][0].weight, state[key])


def _sample(*overrides, cwd):
    cmd = [sys.executable, str(REPO / "scripts/sample.py"), "num_samples=4", "batch_size=2", "labels=[1,2,3,4]",
           "model.image_size=16", "model.num_classes=10", "sampler.steps=10", "progress=false", *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


# slow (a script run of a CompVis pair); in the default run test_deep_cache_with_tgate_through_the_run and the
# in-process LDM tests cover loading, stitching and gating a CompVis pair
@pytest.mark.slow
def test_sample_py_runs_a_compvis_pair_stitched_and_gated(tiny_pair, tmp_path):
    (ckpt, config), (ckpt_s, config_s) = tiny_pair
    common = ["+exp=ldm_stitch_0.4", f"model.ckpt={ckpt}", f"model.compvis_config={config}",
              f"family.stitch.small.ckpt={ckpt_s}", f"family.stitch.small.compvis_config={config_s}"]
    stitched = _sample(*common, f"hydra.run.dir={tmp_path / 'stitch'}", cwd=tmp_path)
    assert stitched.returncode == 0, stitched.stderr[-3000:]
    gated = _sample(*common, "accel=[tstitch,tgate]", "accel.tgate.gate_step=5", "accel.tgate.sp_interval=2",
                    "accel.tgate.warm_up=1", f"hydra.run.dir={tmp_path / 'gate'}", cwd=tmp_path)
    assert gated.returncode == 0, gated.stderr[-3000:]
    import json

    m_stitch = json.loads((tmp_path / "stitch/metrics.json").read_text())
    m_gate = json.loads((tmp_path / "gate/metrics.json").read_text())
    assert m_stitch["steps_per_model"] == {"LDM-S": 4, "LDM": 6}
    assert m_gate["steps_per_model"] == {"LDM-S": 4, "LDM": 6}
    assert m_gate["macs_per_image"] < m_stitch["macs_per_image"]  # gating skipped attention and guidance
    for run in ("stitch", "gate"):
        pngs = sorted((tmp_path / run).glob("*.png"))
        assert len([p for p in pngs if p.name != "grid.png"]) == 4
        assert np.asarray(Image.open(pngs[0])).shape == (16, 16, 3)


def test_missing_prefix_and_bad_yaml_are_named(tiny_pair, tmp_path):
    (ckpt, config), _ = tiny_pair
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    no_cond = tmp_path / "no_cond.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}}, no_cond)
    with pytest.raises(ValueError, match="has no 'cond_stage_model.' keys"):
        build_ldm("tiny", pretrained=True, num_classes=10, ckpt=no_cond, compvis_config=config)
    no_first = tmp_path / "no_first.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}}, no_first)
    with pytest.raises(ValueError, match="has no 'first_stage_model.' keys"):
        load_first_stage(ckpt=no_first, compvis_config=config, pretrained=True)
    partial = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if "out.2" not in k}}, partial)
    with pytest.raises(ValueError, match=r"missing keys \(2\): out.2.bias, out.2.weight"):
        build_ldm("tiny", pretrained=True, num_classes=10, ckpt=partial, compvis_config=config)
    bad = read_compvis_config(config)
    bad["unet_config"]["params"]["use_bogus_flag"] = True
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump({"model": {"params": bad}}))
    with pytest.raises(ValueError, match=r"does not take: \['use_bogus_flag'\]"):
        build_ldm("tiny", pretrained=True, num_classes=10, ckpt=ckpt, compvis_config=bad_yaml)
    with pytest.raises(ValueError, match="model.num_classes=1000, but the class embedder has 10 classes"):
        build_ldm("tiny", pretrained=True, num_classes=1000, ckpt=ckpt, compvis_config=config)
    with pytest.raises(ValueError, match="needs model.ckpt"):
        build_ldm("LDM-cin256-v2", pretrained=True, compvis_config=config)


def test_deep_cache_with_tgate_through_the_run(tiny_pair, tmp_path, compose_sample):
    from runs.run import run_from_config

    (ckpt, config), _ = tiny_pair
    common = ["+exp=ldm_cin256_v2", f"model.ckpt={ckpt}", f"model.compvis_config={config}", "model.image_size=16",
              "model.num_classes=10", "labels=[1,2]", "num_samples=2", "batch_size=2", "sampler.steps=10",
              "progress=false"]
    plain = run_from_config(compose_sample(*common), tmp_path / "plain")
    cached = run_from_config(compose_sample(*common, "accel=[tgate,deep_cache]", "accel.tgate.gate_step=5"),
                             tmp_path / "cached")
    assert cached["macs_per_image"] < 0.8 * plain["macs_per_image"]
    assert len(list((tmp_path / "cached").glob("0*.png"))) == 2
