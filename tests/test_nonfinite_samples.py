"""Samples whose latents come out NaN/inf stop the run (item 3 of issue 18): named by index, with the
models; their batch is not written and the folder is not marked done."""
import os
import subprocess
import sys

import pytest
import torch

from diffusion.finite import NonFiniteSamplesError, check_finite_latents, first_nonfinite
from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
DIGITS_L, DIGITS_S = ROOT / "checkpoints/digits/digits_l.pt", ROOT / "checkpoints/digits/digits_s.pt"
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=6", "progress=false", "num_threads=1", "num_samples=6",
          "batch_size=2", f"family.stitch.small.ckpt={DIGITS_S}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def overflowing_ckpt(tmp_path_factory):
    """The large digits model with finite weights whose class-3 embedding is huge (1e37): every sample
    of class 3 overflows to inf/NaN inside the network, the others are untouched, as fp16 overflow
    or a diverged fine-tune does. The checkpoint check cannot see it; the latents check must."""
    state = torch.load(DIGITS_L, weights_only=True)
    state["ema"]["y_embedder.embedding_table.weight"][3] *= 1e37
    assert first_nonfinite(state) is None
    path = tmp_path_factory.mktemp("overflow") / "digits_l_class3.pt"
    torch.save(state, path)
    return path


def test_a_non_finite_batch_stops_the_run_naming_samples_and_models(compose_sample, tmp_path, overflowing_ckpt):
    folder = tmp_path / "run"
    with pytest.raises(NonFiniteSamplesError) as err:  # labels 0, 1, 2, ... : sample 3 is class 3, in batch [2, 3]
        run_from_config(compose_sample(*DIGITS, f"model.ckpt={overflowing_ckpt}"), folder)
    assert str(err.value).startswith("samples [3] came out NaN/inf after the last step "
                                     "(models: DiT-digits-S -> DiT-digits-L)")
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png"]  # batch [2, 3] not written
    assert not (folder / "done").exists() and not (folder / "samples.npz").exists()
    # the check is on the latents, not a blanket refusal of the weights: without class 3 they sample fine
    run_from_config(compose_sample(*DIGITS, f"model.ckpt={overflowing_ckpt}", "labels=[0,1,2,4,5,6]"),
                    tmp_path / "other")
    assert (tmp_path / "other" / "done").is_file()


# slow (a script run); the stop is checked in-process above and the one-line form of every error by
# tests/test_script_errors.py
@pytest.mark.slow
def test_the_script_reports_it_in_one_line(tmp_path, overflowing_ckpt):
    cmd = [sys.executable, "scripts/sample.py", *DIGITS, f"model.ckpt={overflowing_ckpt}", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: samples [3] came out NaN/inf") and "DiT-digits-S -> DiT-digits-L" in line
    assert not (tmp_path / "done").exists()


def test_check_finite_latents_names_each_bad_sample():
    latents = torch.zeros(4, 2, 3, 3)
    check_finite_latents(latents, [10, 11, 12, 13], ["A"])  # finite: nothing
    latents[1, 0, 0, 0] = float("nan")
    latents[3, 1, 2, 2] = float("-inf")
    with pytest.raises(NonFiniteSamplesError, match=r"samples \[11, 13\] came out NaN/inf .*\(models: A -> B\)"):
        check_finite_latents(latents, [10, 11, 12, 13], ["A", "B"])
