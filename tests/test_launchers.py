"""Sweeps through Hydra's launchers (basic, submitit local, the SLURM config) and W&B offline logging."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from runs.distributed import Dist, dist_from_env

from conftest import CONFIGS
from wandb_offline import summarize

ROOT = CONFIGS.parent
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=4", "num_samples=4", "batch_size=4", "progress=false",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}"]
# two jobs that run (the small model's checkpoint spelled two ways), and one that fails in the job: the large
# model's checkpoint given as the small one is refused when it is read (a bad setting, e.g. a fraction outside
# [0, 1], would stop the whole sweep before its first job: tests/test_refusals.py)
SMALL = [str(ROOT / "checkpoints/digits/digits_s.pt"), "checkpoints/digits/digits_s.pt",
         str(ROOT / "checkpoints/digits/digits_l.pt")]
SWEEP = "family.stitch.small.ckpt=" + ",".join(SMALL)


def _multirun(tmp_path, *extra, env=None):
    cmd = [sys.executable, "scripts/sample.py", "-m", *DIGITS, SWEEP, f"hydra.sweep.dir={tmp_path}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check_sweep(tmp_path, proc):
    """Jobs 0 and 1 complete; job 2 failed (reported, nonzero exit) without stopping them."""
    assert proc.returncode != 0 and "does not match the model" in proc.stderr, proc.stderr[-3000:]
    for job, small_steps in (("0", 2), ("1", 2)):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert metrics["num_images"] == 4 and metrics["steps_per_model"]["DiT-digits-S"] == small_steps
        assert (tmp_path / job / "done").is_file()
    assert not (tmp_path / "2" / "metrics.json").exists() and not list((tmp_path / "2").glob("*.png"))


def test_multirun_with_wandb_offline(tmp_path):
    """Acceptance (launcher and W&B): a local multirun (Hydra's basic launcher) over two settings
    completes though a third job fails; with logger=wandb and WANDB_MODE=offline each job writes
    its own offline run in its folder holding the resolved config, metrics.json's numbers and
    grid.png, finished with exit code 0, and 1 for the failed job (wandb.finish even on error)."""
    from evaluation.digits import real_digits_uint8

    digits, _ = real_digits_uint8()
    reference = tmp_path / "reference.npz"  # 6 real digits as RGB, ADM's layout
    np.savez(reference, arr_0=np.repeat(digits[:6, :, :, None], 3, axis=-1))
    # FID etc. at the end of each job (Inception with random weights: no download), logged too
    proc = _multirun(tmp_path / "sweep", "logger=wandb", f"evaluate.reference={reference}",
                     "evaluate.inception_weights=random", "evaluate.dims=64", "evaluate.nearest_k=2",
                     env={"WANDB_MODE": "offline"})
    tmp_path = tmp_path / "sweep"
    _check_sweep(tmp_path, proc)
    for job, small in (("0", SMALL[0]), ("1", SMALL[1])):
        folder = tmp_path / job
        (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
        run = summarize(run_file)
        assert run["run_id"] == (folder / "wandb_run_id").read_text().strip()
        assert run["config"]["accel"]["models"]["small"]["ckpt"] == small and run["config"]["num_samples"] == 4
        assert run["config"]["model"]["name"] == "DiT-digits-L"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert run["summary"]["sampling_seconds"] == pytest.approx(metrics["sampling_seconds"])
        assert metrics["fid_dims"] == 64 and metrics["num_reference"] == 6 and 0 <= metrics["precision"] <= 1
        assert run["summary"]["fid"] == pytest.approx(metrics["fid"])
        assert run["summary"]["steps_per_model/DiT-digits-S"] == metrics["steps_per_model"]["DiT-digits-S"]
        assert any("sampling_seconds" in row for row in run["history"])
        summary = run["summary"]  # the image's entry, keys flattened: grid/_type, grid/path, ...
        assert summary["grid/_type"] == "image-file" and (run_file.parent / "files" / summary["grid/path"]).is_file()
        assert run["exit_code"] == 0
    (failed,) = (tmp_path / "2").glob("wandb/offline-run-*/run-*.wandb")
    assert summarize(failed)["exit_code"] == 1


@pytest.mark.slow
def test_multirun_with_submitit_local(tmp_path):
    """The same sweep through hydra-submitit-launcher's local executor (each job a process, as on SLURM)."""
    proc = _multirun(tmp_path, "hydra/launcher=submitit_local", env={"WANDB_MODE": "disabled"})
    _check_sweep(tmp_path, proc)
    assert (tmp_path / ".submitit").is_dir()


def test_slurm_launcher_config():
    """hydra/launcher=slurm composes to submitit's SLURM launcher, one task per GPU, requeues; not a default."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            default = compose("sample", return_hydra_config=True)
            cfg = compose("sample", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                               "hydra.launcher.partition=gpu"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert "BasicLauncher" in default.hydra.launcher._target_
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4 and launcher.partition == "gpu"
    assert launcher.max_num_timeout > 0 and launcher.timeout_min > 0


def test_rank_and_world_from_the_launchers_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert dist_from_env() == Dist(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_from_env() == Dist(3, 4, 1)
    import torch

    assert Dist(3, 4, 1).device(torch.device("cuda")) == torch.device("cuda", 1)
    assert Dist(3, 4, 1).device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        dist_from_env()
