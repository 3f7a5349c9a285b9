"""Techniques compose by name: one config file per technique (configs/accel/), combined by list
(accel=[tstitch,tgate]) in one order whatever the list's, the model family's facts with the model
(configs/family/), refusals by technique and model before any weights, and folders written before
the change (`accel=tstitch_digits` and friends) that still resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from diffusion.errors import UserError
from runs.resume import CONFIG_FILE
from runs.run import build_hooks, check_config, model_configs, run_from_config
from runs.techniques import ORDER, check_requested, label, listed, requested

from conftest import CONFIGS

ROOT = CONFIGS.parent
DIGITS = ["+exp=digits_stitch_0.4", f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
TINY_RUN = ["sampler.steps=6", "num_samples=4", "batch_size=4", "progress=false", "num_threads=1"]


def test_one_file_per_technique_each_setting_only_its_own_keys():
    files = {p.stem: yaml.safe_load(p.read_text()) or {} for p in (CONFIGS / "accel").glob("*.yaml")}
    assert {"none", *ORDER} <= set(files)
    for name, data in files.items():
        assert "defaults" not in data and "name" not in data, name  # no combination, no alias of another file
        if name == "none":
            assert data == {"models": {}, "hooks": {}, "pipeline": {}}
            continue
        assert set(data) <= {name, "hooks", "pipeline", "models"} and name in data, name
        assert set(data.get("hooks") or {}) | set(data.get("pipeline") or {}) == {name}, name
        assert "models" not in data or name == "tstitch", name


@pytest.mark.parametrize("accel", ["[tstitch,tgate]", "[tgate,tstitch]"])
def test_the_list_order_does_not_change_the_run(compose_sample, accel):
    cfg = compose_sample("+exp=digits_stitch_0.4", f"accel={accel}")
    assert listed(cfg.accel) == ("tstitch", "tgate") and label(cfg.accel) == "tstitch+tgate"
    assert [type(h).__name__ for h in build_hooks(cfg)] == ["TStitchHook", "TGateHook"]
    assert [str(c.name) for c in model_configs(cfg)] == ["DiT-digits-S", "DiT-digits-L"]


def test_none_and_the_empty_list_are_the_plain_run(compose_sample):
    for accel in ("none", "[]"):
        cfg = compose_sample("+exp=digits_stitch_0.4", f"accel={accel}")
        assert label(cfg.accel) == "none" and build_hooks(cfg) == []
        assert [str(c.name) for c in model_configs(cfg)] == ["DiT-digits-L"]


def test_tstitch_stitches_the_family_partner(compose_sample):
    cfg = compose_sample("+exp=digits_stitch_0.4", "accel=tstitch")
    assert [str(c.name) for c in model_configs(cfg)] == ["DiT-digits-S", "DiT-digits-L"]
    assert cfg.accel.models.small.ckpt == "checkpoints/digits/digits_s.pt"
    # LDM: its partner LDM-S and T-Stitch's LDM timestep rule come with the model
    ldm = compose_sample("+exp=ldm_stitch_0.4")
    assert ldm.accel.models.small.name == "LDM-S" and ldm.accel.hooks.tstitch.timestep_form == "ldm"
    # the partner is overridable: another model config, or (three models) the family's second partner
    swapped = compose_sample("model=dit_xl2", "accel=tstitch", "model@family.stitch.small=dit_b2")
    assert [str(c.name) for c in model_configs(swapped)] == ["DiT-B/2", "DiT-XL/2"]
    three = compose_sample("+exp=dit_stitch_sbxl")
    assert [str(c.name) for c in model_configs(three)] == ["DiT-S/2", "DiT-B/2", "DiT-XL/2"]


def test_sdxl_stitches_ssd1b_with_its_t_gate_setting(compose_sample):
    cfg = compose_sample("model=sdxl", "sampler=pipeline", "accel=[tstitch,tgate]")
    assert cfg.accel.models.small.name == "SSD-1B"
    stitch = OmegaConf.to_container(cfg.accel.pipeline.tstitch, resolve=True)
    assert stitch["small"] == "segmind/SSD-1B" and stitch["variant"] == "fp16"
    gate = OmegaConf.to_container(cfg.accel.pipeline.tgate.config, resolve=True)
    assert {k: gate[k] for k in ("gate_step", "sp_interval", "fi_interval", "warm_up", "branch")} == {
        "gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2, "branch": "uncond"}  # T-GATE's SD-XL


@pytest.mark.parametrize("overrides, message", [
    (["accel=[tstitch,deep_cache]"], r"deep_cache acts on U-Net models and 'DiT-digits-L' is a DiT"),
    (["model=dit_s2", "accel=tstitch"], r"model 'DiT-S/2' has no T-Stitch partner"),
    (["model=pixart_alpha", "sampler=pipeline", "prompts=[a]", "accel=tstitch"], r"has no T-Stitch partner"),
    (["model=sd35_large", "sampler=pipeline", "prompts=[a]", "accel=tgate", "accel.tgate.cache_attention=true"],
     r"MM-DiT.*joint attention"),
    (["model@family.stitch.small=sd15", "accel=tstitch"], r"cannot be stitched: one is a diffusers pipeline"),
])
def test_refusals_by_technique_and_model_are_one_line(compose_sample, overrides, message):
    cfg = compose_sample("+exp=digits_stitch_0.4", *overrides)
    check = check_config
    if cfg.model.get("kind") == "pipeline":
        from runs.pipeline_run import check_pipeline_config as check
    with pytest.raises(UserError, match=message) as err:
        check(cfg)
    assert "\n" not in str(err.value)


def test_a_technique_listed_twice_is_refused():
    assert requested(["+exp=digits_fast", "accel=[tgate,tstitch,tgate]"]) == ["tgate", "tstitch", "tgate"]
    assert requested(["accel=tgate"]) == ["tgate"] and requested(["seed=1"]) is None
    with pytest.raises(UserError, match=r"^accel=\[tgate,tstitch,tgate\]: tgate listed more than once"):
        check_requested(["tgate", "tstitch", "tgate"])
    check_requested(["tstitch", "tgate"])


def test_the_script_refuses_deep_cache_on_a_dit_before_reading_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "scripts/sample.py", "+exp=digits_stitch_0.4", "accel=[tstitch,deep_cache]",
           "model.ckpt=/nonexistent.pt", f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: accel=[tstitch,deep_cache]: deep_cache"), proc.stderr
    assert "DiT" in lines[0] and "nonexistent" not in lines[0]


def _old_layout(config: dict) -> dict:
    """samples_config.json as runs wrote it before techniques composed by name: the accel node of
    configs/accel/tstitch_digits.yaml (a name, the models, hooks and settings; no pipeline entry), no family."""
    old = {k: v for k, v in config.items() if k not in ("family", "precision")}  # precision: added later still
    accel = config["accel"]
    old["accel"] = {"name": "tstitch_digits", "models": accel["models"], "hooks": accel["hooks"],
                    "tstitch": {k: accel["tstitch"][k] for k in ("ratio", "fractions", "rule", "timestep_form")}}
    return old


def test_a_folder_written_before_the_change_resumes_and_real_differences_are_refused(compose_sample, tmp_path):
    cfg = compose_sample(*DIGITS, *TINY_RUN)
    run_from_config(cfg, tmp_path / "whole")
    folder = tmp_path / "old"
    run_from_config(cfg, folder)
    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert "family" in saved and "pipeline" in saved["accel"]  # what the old layout lacks
    (folder / CONFIG_FILE).write_text(json.dumps(_old_layout(saved)))
    for name in ("done", "000002.png", "samples.npz"):  # an old folder, cut short
        (folder / name).unlink()
    with pytest.raises(UserError, match=r"accel.hooks.tstitch.ratio: folder has 0.4, this run 0.5"):
        run_from_config(compose_sample(*DIGITS, *TINY_RUN, "accel.tstitch.ratio=0.5"), folder)
    with pytest.raises(UserError, match=r"accel.hooks.tgate: folder has None"):
        run_from_config(compose_sample(*DIGITS, *TINY_RUN, "accel=[tstitch,tgate]"), folder)
    metrics = run_from_config(cfg, folder)
    assert metrics["num_generated"] == 1 and metrics["accel"] == "tstitch"
    whole, resumed = (np.load(tmp_path / k / "samples.npz")["arr_0"] for k in ("whole", "old"))
    np.testing.assert_array_equal(resumed, whole)
    plain = run_from_config(compose_sample(*DIGITS, *TINY_RUN, "accel=none"), tmp_path / "plain")
    assert plain["accel"] == "none"
    assert not np.array_equal(np.load(tmp_path / "plain" / "samples.npz")["arr_0"], whole)  # the test can fail
