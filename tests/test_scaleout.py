"""Scale-out on the digits pair: two torchrun ranks, resume, a killed run, the done marker."""
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
# the shipped pair, few steps: a batch of 2 samples takes milliseconds
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=6", "progress=false", "num_threads=1",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


def _pixels(folder: Path, k: int) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{k:06d}.png"))


# slow (two torchrun ranks sampling); in the default run tests/test_folder_lock.py starts torchrun ranks, and
# the resume tests here check that images do not depend on how the batches are split
@pytest.mark.slow
def test_two_torchrun_ranks_give_the_images_of_one_process(compose_sample, tmp_path):
    """Acceptance: `torchrun --nproc_per_node 2` (gloo on CPU) writes the same numbered PNGs as one
    process, into one folder (rank 0's; rank 1's own Hydra folder is removed)."""
    n, bs = 8, 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "scripts/sample.py", *DIGITS, f"num_samples={n}", f"batch_size={bs}",
           # each rank's Hydra folder differs (as ${now} may a second apart): rank 0's must win
           f"hydra.run.dir={tmp_path}/rank" + "${oc.env:RANK}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = tmp_path / "rank0"
    assert not (tmp_path / "rank1").exists()

    cfg = compose_sample(*DIGITS, f"num_samples={n}", f"batch_size={bs}")
    single = run_from_config(cfg, tmp_path / "single")
    a, b = _pngs(two), _pngs(tmp_path / "single")
    assert sorted(a) == [f"{k:06d}.png" for k in range(n)]
    assert a == b  # byte for byte: each batch has the same composition in both runs
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["num_generated"] == metrics["num_images"] == n
    assert len(metrics["sampling_seconds_per_rank"]) == 2
    assert metrics["steps_per_model"] == single["steps_per_model"] == {"DiT-digits-S": 2, "DiT-digits-L": 4}
    np.testing.assert_array_equal(np.load(two / "samples.npz")["arr_0"],
                                  np.load(tmp_path / "single" / "samples.npz")["arr_0"])
    assert (two / "done").is_file()


def test_resume_6_then_12_equals_one_run_of_12(compose_sample, tmp_path):
    """Acceptance: 6 samples, then 12 into the same folder -> 6 new ones; all 12 equal a run of 12."""
    first = run_from_config(compose_sample(*DIGITS, "num_samples=6", "batch_size=3"), tmp_path / "resumed")
    assert first["num_generated"] == 6 and np.load(tmp_path / "resumed" / "samples.npz")["arr_0"].shape[0] == 6
    before = {k: os.stat(tmp_path / "resumed" / f"{k:06d}.png").st_mtime_ns for k in range(6)}
    second = run_from_config(compose_sample(*DIGITS, "num_samples=12", "batch_size=3"), tmp_path / "resumed")
    assert second["num_generated"] == 6 and second["num_images"] == 12
    assert {k: os.stat(tmp_path / "resumed" / f"{k:06d}.png").st_mtime_ns for k in range(6)} == before  # untouched
    run_from_config(compose_sample(*DIGITS, "num_samples=12", "batch_size=3"), tmp_path / "once")
    assert _pngs(tmp_path / "resumed") == _pngs(tmp_path / "once")
    resumed, once = (np.load(tmp_path / x / "samples.npz") for x in ("resumed", "once"))
    assert resumed["arr_0"].shape == (12, 8, 8, 3)  # rebuilt with the new samples
    np.testing.assert_array_equal(resumed["arr_0"], once["arr_0"])
    np.testing.assert_array_equal(resumed["arr_1"], once["arr_1"])
    # complete: a third run does nothing (done marker), and says so through the same metrics
    third = run_from_config(compose_sample(*DIGITS, "num_samples=12", "batch_size=3"), tmp_path / "resumed")
    assert third == second


def test_a_failure_mid_run_loses_only_the_batch_in_flight(compose_sample, tmp_path, monkeypatch):
    """An error in the second batch: the first batch's PNGs stay, no npz, no done, no temporaries;
    the rerun makes only what is missing and the result equals an uninterrupted run."""
    generate_module = importlib.import_module("runs.generate")  # the package exports a function of that name
    real_save, calls = generate_module.save_sample_pngs, []

    def failing_save(images, indices, out_dir):
        calls.append(list(indices))
        if len(calls) == 2:
            real_save(images[:1], indices[:1], out_dir)  # one PNG of the batch made it, then the crash
            raise RuntimeError("injected failure in batch 2")
        real_save(images, indices, out_dir)

    monkeypatch.setattr(generate_module, "save_sample_pngs", failing_save)
    with pytest.raises(RuntimeError, match="injected"):
        run_from_config(compose_sample(*DIGITS, "num_samples=9", "batch_size=3"), tmp_path / "run")
    folder = tmp_path / "run"
    assert sorted(_pngs(folder)) == [f"{k:06d}.png" for k in range(4)]
    assert not (folder / "done").exists() and not (folder / "samples.npz").exists()
    assert not list(folder.glob(".*tmp*"))
    monkeypatch.setattr(generate_module, "save_sample_pngs", real_save)
    again = run_from_config(compose_sample(*DIGITS, "num_samples=9", "batch_size=3"), folder)
    assert again["num_generated"] == 5 and (folder / "done").is_file()
    run_from_config(compose_sample(*DIGITS, "num_samples=9", "batch_size=3"), tmp_path / "once")
    # sample 4 and 5 ran as a batch of 2 in the rerun (3 in one go): equal up to batch-size rounding
    for k in range(9):
        diff = np.abs(_pixels(folder, k).astype(int) - _pixels(tmp_path / "once", k).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (k, diff.max())
        if k not in (4, 5):
            assert diff.max() == 0


KILLER = """
import importlib, os, signal, sys
g = importlib.import_module('runs.generate')
real, calls = g.save_sample_pngs, []
def save(images, indices, out_dir):
    calls.append(1)
    if len(calls) == 2:  # killed outright while writing the second batch: no cleanup runs
        from diffusion.outputs import sample_filename
        from pathlib import Path
        (Path(out_dir) / ('.' + sample_filename(indices[0]) + '.tmp12345')).write_bytes(b'half a png')
        os.kill(os.getpid(), signal.SIGKILL)
    real(images, indices, out_dir)
g.save_sample_pngs = save
sys.argv = ['scripts/sample.py'] + sys.argv[1:]
exec(compile(open('scripts/sample.py').read(), 'scripts/sample.py', 'exec'))
"""


def test_a_killed_process_resumes_cleanly(compose_sample, tmp_path):
    """SIGKILL in the second batch (a half-written temporary left behind); a rerun into the folder
    removes the temporary, makes only the rest and marks the folder done."""
    args = [*DIGITS, "num_samples=6", "batch_size=2"]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args, f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(_pngs(tmp_path)) == ["000000.png", "000001.png"] and list(tmp_path.glob(".*tmp*"))
    assert not (tmp_path / "done").exists()
    # the killed run's lock file is left behind; its lock died with the process, so the rerun takes it
    assert json.loads((tmp_path / ".lock").read_text())["pid"] != os.getpid()
    metrics = run_from_config(compose_sample(*args), tmp_path)  # the rerun (in-process: the same code path)
    assert sorted(_pngs(tmp_path)) == [f"{k:06d}.png" for k in range(6)] and not list(tmp_path.glob(".*tmp*"))
    assert metrics["num_generated"] == 4 and json.loads((tmp_path / "done").read_text())["num_samples"] == 6
    for k in range(6):
        Image.open(tmp_path / f"{k:06d}.png").verify()


def test_a_folder_of_another_config_is_refused(compose_sample, tmp_path):
    run_from_config(compose_sample(*DIGITS, "num_samples=2", "batch_size=2"), tmp_path)
    with pytest.raises(ValueError, match=r"holds samples of another config \(seed: folder has 0, this run 1"):
        run_from_config(compose_sample(*DIGITS, "num_samples=4", "batch_size=2", "seed=1"), tmp_path)
    assert sorted(_pngs(tmp_path)) == ["000000.png", "000001.png"]
