"""The shipped digits pair and the main job (python scripts/sample.py +exp=digits_stitch_0.4)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.digits import evaluate_digits
from runs.run import build_denoiser, model_configs, run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
CKPTS = {"DiT-digits-S": ROOT / "checkpoints/digits/digits_s.pt",
         "DiT-digits-L": ROOT / "checkpoints/digits/digits_l.pt"}


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name the checkpoints relative to the repository root


def test_shipped_checkpoints_match_their_configs(compose_sample):
    cfg = compose_sample("+exp=digits_stitch_0.4")
    sizes = {}
    for c in model_configs(cfg):
        model = build_denoiser(c, 8, pretrained=True, device="cpu")  # loads the shipped EMA weights, strict
        sizes[c.name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        saved = torch.load(CKPTS[c.name], weights_only=True)
        assert set(saved) == {"ema", "config", "step"}
        # the file records how it was made: its own model config and the number of steps
        assert saved["config"]["model"]["arch"] == dict(c.arch) and saved["step"] >= 1000
    assert sizes["DiT-digits-S"] < 500_000 < 2_000_000 < sizes["DiT-digits-L"]


def test_main_job_configuration(compose_sample):
    cfg = compose_sample("+exp=digits_stitch_0.4")
    assert [c.name for c in model_configs(cfg)] == ["DiT-digits-S", "DiT-digits-L"]
    assert cfg.accel.tstitch.ratio == 0.4 and cfg.vae.source is None and cfg.vae.channels == 1
    assert cfg.grid_by_label and list(cfg.labels) == list(range(10))


def test_short_stitched_run_gives_digits(compose_sample, tmp_path):
    """20 samples, 10 DDIM steps (a second): files, one grid row per class, recognisable digits."""
    cfg = compose_sample("+exp=digits_stitch_0.4", "num_samples=20", "batch_size=20", "sampler.steps=10",
                         "progress=false")
    metrics = run_from_config(cfg, tmp_path)
    assert metrics["steps_per_model"] == {"DiT-digits-S": 4, "DiT-digits-L": 6}
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].shape == (20, 8, 8, 3) and list(npz["arr_1"][:10]) == list(range(10))
    assert Image.open(tmp_path / "grid.png").size == (2 * 10 + 2, 10 * 10 + 2)  # 10 rows (classes) of 2
    assert evaluate_digits(npz["arr_0"], npz["arr_1"])["accuracy"] >= 0.7


@pytest.mark.slow
def test_main_job_from_the_command_line(tmp_path):
    """The README's main job exactly: under two minutes, >= 80% classifier agreement."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/sample.py", "+exp=digits_stitch_0.4", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = np.load(tmp_path / "samples.npz")
    result = evaluate_digits(npz["arr_0"], npz["arr_1"])
    assert result["accuracy"] >= 0.8, result
    assert seconds < 120, seconds
    steps_per_model = json.loads((tmp_path / "metrics.json").read_text())["steps_per_model"]
    assert steps_per_model == {"DiT-digits-S": 20, "DiT-digits-L": 30}
