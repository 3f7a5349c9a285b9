"""Evaluation settings are checked before any sampling (item 2 of issue 18): a missing or malformed
reference, unreadable Inception weights or a bad value stop the run at once, with one line."""
import os
import subprocess
import sys
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.errors import UserError
from evaluation.inception import WEIGHTS_FILE, _fid_inception
from evaluation.run_eval import check_evaluate_settings

from conftest import CONFIGS

ROOT = CONFIGS.parent
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=4", "progress=false", "num_threads=1", "num_samples=2",
          "batch_size=2", f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _settings(**changes):
    return {"reference": None, "inception_weights": "random", "dims": 2048, "batch_size": 50, "nearest_k": 3,
            "reference_stats": "auto", **changes}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    return path


@pytest.mark.parametrize("setting", ["evaluate.reference=missing.npz", "evaluate.inception_weights=JUNK"])
def test_bad_evaluation_settings_stop_the_run_before_sampling(tmp_path, reference, setting):
    """The issue's commands: before, they sampled everything, wrote `done`, then failed."""
    (tmp_path / "junk.pth").write_bytes(os.urandom(1000))
    setting = setting.replace("JUNK", str(tmp_path / "junk.pth"))
    cmd = [sys.executable, "scripts/sample.py", *DIGITS, f"evaluate.reference={reference}", setting,
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    key, value = setting.split("=", 1)
    assert line.startswith(f"error: {key}={value}: "), line
    assert "no such file or folder" in line or "not a PyTorch checkpoint" in line
    assert not list((tmp_path / "run").glob("*.png")) and not (tmp_path / "run" / "done").exists()


def test_references_are_checked_without_reading_their_images(tmp_path, reference):
    check_evaluate_settings(_settings(reference=reference))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid's statistics file
    check_evaluate_settings(_settings(reference=tmp_path / "stats.npz"))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    check_evaluate_settings(_settings(reference=tmp_path / "images"))
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "stats.npz").read_bytes()[:100])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad_images").mkdir()
    (tmp_path / "bad_images" / "a.png").write_bytes(b"")
    for path, problem in ((tmp_path / "missing.npz", "no such file or folder"),
                          (tmp_path / "keys.npz", r"holds \['images'\]"),
                          (tmp_path / "float.npz", r"arr_0 is float32 of shape \(2, 8, 8, 3\)"),
                          (tmp_path / "cut.npz", "not a readable .npz"),
                          (tmp_path / "empty", "a folder without images"),
                          (tmp_path / "bad_images", "its image a.png does not decode"),
                          (tmp_path / "images" / "a.png", "not an .npz")):
        with pytest.raises(UserError, match=rf"^evaluate.reference={path}: {problem}"):
            check_evaluate_settings(_settings(reference=path))


@pytest.mark.parametrize("key,value,problem", [
    ("dims", 100, r"allowed are \[64, 192, 768, 2048\]"),
    ("batch_size", 0, "must be an integer >= 1"),
    ("nearest_k", "3", "must be an integer >= 1"),
    ("reference_stats", "file", "allowed are auto"),
])
def test_bad_values_are_named(reference, key, value, problem):
    with pytest.raises(UserError, match=rf"^evaluate.{key}={value}: {problem}"):
        check_evaluate_settings(_settings(reference=reference, **{key: value}))


def test_inception_weights_are_read_and_matched_to_the_network(tmp_path, reference, monkeypatch):
    torch.manual_seed(0)
    good = tmp_path / WEIGHTS_FILE
    torch.save(_fid_inception("random").state_dict(), good)
    check_evaluate_settings(_settings(reference=reference, inception_weights=good))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=rf"^evaluate.inception_weights={tmp_path / 'other.pth'}: not pytorch-fid's"):
        check_evaluate_settings(_settings(reference=reference, inception_weights=tmp_path / "other.pth"))
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"^evaluate.inception_weights={tmp_path / 'cut.pth'}: truncated"):
        check_evaluate_settings(_settings(reference=reference, inception_weights=tmp_path / "cut.pth"))
    # null: the hub cache, fetched now when missing (offline here: the run stops before sampling)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(URLError("offline")))
    with pytest.raises(UserError, match=r"^evaluate.inception_weights=None: the FID Inception weights are not in"):
        check_evaluate_settings(_settings(reference=reference, inception_weights=None))
