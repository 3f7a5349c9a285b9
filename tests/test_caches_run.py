"""The caches through scripts/sample.py's run (configs/accel/<cache>.yaml) on the digits pair."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caches import CacheHook
from runs.run import build_hooks, run_from_config
from runs.techniques import label

from conftest import CONFIGS

ROOT = CONFIGS.parent
CACHES = ["first_block_cache", "taylorseer", "mag_cache", "faster_cache", "pab", "sea_cache"]
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=12", "progress=false", "num_threads=1", "labels=[3]",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}"]
CAL = f"accel.mag_cache.calibration={ROOT / 'calibrations/mag_cache/digits.json'}"


def overrides(accel: str) -> list[str]:
    extra = [CAL] if "mag_cache" in accel else []
    if accel.startswith("["):
        extra.append(f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}")
    return [*DIGITS, f"accel={accel}", *extra]


@pytest.mark.parametrize("accel", CACHES)
def test_each_cache_config_composes_into_its_hook(compose_sample, accel):
    cfg = compose_sample(f"accel={accel}", *([CAL] if accel == "mag_cache" else []))
    hooks = build_hooks(cfg)
    assert label(cfg.accel) == accel and len(hooks) == 1 and isinstance(hooks[0], CacheHook)
    assert hooks[0].name == accel


@pytest.mark.parametrize("accel", CACHES)
def test_batch_two_equals_a_run_started_at_its_seed(compose_sample, tmp_path, run_latents, accel):
    whole = run_from_config(compose_sample(*overrides(accel), "num_samples=4", "batch_size=2"), tmp_path / "a")
    run_from_config(compose_sample(*overrides(accel), "num_samples=2", "batch_size=2", "seed=2"), tmp_path / "b")
    assert torch.equal(run_latents(tmp_path / "a")[2:], run_latents(tmp_path / "b"))
    # the work really done is in metrics.json, below the plain run's
    assert whole["cache"] == accel and whole["macs_per_image_spent"] < whole["macs_per_image"]
    key = "cache_attention_computed_per_image" if accel in ("pab", "faster_cache") else \
        "cache_blocks_computed_per_image"
    assert whole[key] < 2 * 8 * 12


def test_stitched_taylorseer_runs_and_removing_the_cache_restores_the_plain_samples(compose_sample, tmp_path):
    stitched = run_from_config(compose_sample(*overrides("[tstitch,taylorseer]"), "num_samples=2",
                                              "batch_size=2"), tmp_path / "st")
    assert stitched["steps_per_model"] == {"DiT-digits-S": 5, "DiT-digits-L": 7}
    run_from_config(compose_sample(*overrides("none"), "num_samples=2", "batch_size=2"), tmp_path / "plain")
    run_from_config(compose_sample(*overrides("taylorseer"), "num_samples=2", "batch_size=2"), tmp_path / "ts")
    run_from_config(compose_sample(*overrides("none"), "num_samples=2", "batch_size=2"), tmp_path / "again")
    plain, ts, again = (np.load(tmp_path / x / "samples.npz")["arr_0"] for x in ("plain", "ts", "again"))
    np.testing.assert_array_equal(plain, again)
    assert np.abs(plain.astype(int) - ts.astype(int)).max() > 0


def test_mag_cache_calibration_is_recorded_and_missing_ones_name_the_command(compose_sample, tmp_path):
    from diffusion.errors import UserError

    run_from_config(compose_sample(*overrides("mag_cache"), "num_samples=2", "batch_size=2"), tmp_path / "m")
    recorded = json.loads((tmp_path / "m" / "samples_config.json").read_text())
    assert recorded["accel"]["mag_cache"]["calibration"].endswith("digits.json")
    with pytest.raises(UserError, match="accel.mag_cache.calibrate=true"):
        run_from_config(compose_sample(*DIGITS, "accel=mag_cache", "accel.mag_cache.calibration=nowhere",
                                       "num_samples=2", "batch_size=2"), tmp_path / "n")
