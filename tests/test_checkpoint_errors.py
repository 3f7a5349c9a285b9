"""Damaged, foreign and NaN checkpoints are refused at load with the setting, the file and what is wrong
(items 3 and 4 of issue 18): model.ckpt, family.stitch.small.ckpt, train.py resume=latest, CompVis
.ckpt, diffusers folders, Inception weights. Never torch's advice to set weights_only=False."""
import os
import re
import subprocess
import sys

import pytest
import torch

from diffusion.checkpoint_files import CheckpointError, read_safetensors, read_torch_file
from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
DIGITS_L, DIGITS_S = ROOT / "checkpoints/digits/digits_l.pt", ROOT / "checkpoints/digits/digits_s.pt"
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=4", "progress=false", "num_threads=1", "num_samples=2",
          "batch_size=2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Payload:
    """Any object a malicious or sloppy checkpoint might pickle."""


def damaged(kind: str, folder, source=DIGITS_L):
    """A copy of `source` damaged as `kind`; returns (path, the problem the error must name)."""
    path = folder / f"{kind}.pt"
    data = source.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return path, r"truncated: a zip archive \(torch.save's format\) without its end"
    if kind == "empty":
        path.write_bytes(b"")
        return path, r"empty file \(0 bytes\)"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
        return path, r"not a PyTorch checkpoint"
    if kind == "pickle":
        torch.save({"ema": torch.load(source, weights_only=True)["ema"], "x": Payload()}, path)
        return path, r"holds pickled Python objects \(test_checkpoint_errors.Payload\).*refused unread"
    state = torch.load(source, weights_only=True)
    name = list(state["ema"])[5]  # tensors before it are fine: the first bad one is named
    state["ema"][name].view(-1)[:3] = float("nan") if kind == "nan" else float("inf")
    torch.save(state, path)
    return path, rf"tensor '{name}' holds {'NaN' if kind == 'nan' else 'inf'} \(3 of [\d,]+ values are not finite\)"


KINDS = ["truncated", "empty", "random", "pickle", "nan", "inf"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("setting", ["model.ckpt", "family.stitch.small.ckpt"])
def test_a_bad_model_checkpoint_is_refused_naming_setting_file_and_problem(compose_sample, tmp_path, setting, kind):
    path, problem = damaged(kind, tmp_path, DIGITS_L if setting == "model.ckpt" else DIGITS_S)
    cfg = compose_sample(*DIGITS, f"model.ckpt={DIGITS_L}", f"family.stitch.small.ckpt={DIGITS_S}", f"{setting}={path}")
    with pytest.raises(CheckpointError) as err:
        run_from_config(cfg, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{setting}={path}: ") and err.value.exit_code == 2
    assert re.search(problem, message), message
    assert "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_script_prints_one_error_line_and_exits_2(tmp_path):
    path, _ = damaged("truncated", tmp_path)
    cmd = [sys.executable, "scripts/sample.py", *DIGITS, f"model.ckpt={path}", f"family.stitch.small.ckpt={DIGITS_S}",
           f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model.ckpt={path}: truncated: "), proc.stderr
    assert not list((tmp_path / "out").glob("*.png")) and not (tmp_path / "out" / "done").exists()


TRAIN_TINY = ["model.arch={depth:1,hidden_size:32,num_heads:2,patch_size:2}", "batch_size=8", "progress=false",
              "num_threads=1"]


def _compose_train(*overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("train", TRAIN_TINY + list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A scripts/train.py run folder with checkpoints after steps 1 and 2 (made once)."""
    from training.train import train

    folder = tmp_path_factory.mktemp("trained") / "run"
    train(_compose_train("steps=2", "ckpt_every=1"), folder)
    return folder


def _damage_latest(trained_run, tmp_path, kind):
    """A copy of the trained run whose latest checkpoint is damaged; (folder, file, expected problem)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    latest = run / "checkpoints" / "0000002.pt"
    if kind == "nan":
        state = torch.load(latest, weights_only=True)
        first = next(iter(state["opt"]["state"]))  # the first parameter with optimiser state
        state["opt"]["state"][first]["exp_avg"].fill_(float("nan"))
        torch.save(state, latest)
        return run, latest, f"tensor 'opt.state.{first}.exp_avg' holds NaN"
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 2] if kind == "truncated" else b"")
    return run, latest, "truncated: " if kind == "truncated" else "empty file (0 bytes)"


@pytest.mark.parametrize("kind", ["truncated", "empty", "nan"])
def test_a_bad_training_checkpoint_is_refused_by_resume_latest(trained_run, tmp_path, kind):
    from training.train import train

    run, latest, problem = _damage_latest(trained_run, tmp_path, kind)
    with pytest.raises(CheckpointError) as err:
        train(_compose_train("steps=3", "resume=latest"), run)
    assert str(err.value).startswith(f"resume={latest}: {problem}") and "weights_only" not in str(err.value)
    assert not (run / "checkpoints" / "0000003.pt").exists()


def test_train_script_prints_one_error_line_and_exits_2(trained_run, tmp_path):
    run, latest, problem = _damage_latest(trained_run, tmp_path, "truncated")
    proc = subprocess.run([sys.executable, "scripts/train.py", *TRAIN_TINY, "steps=3", "resume=latest",
                           f"hydra.run.dir={run}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: resume={latest}: {problem}"), line


def test_compvis_checkpoints_are_checked_too(tmp_path):
    from test_ldm_checkpoint import compvis_params, write_compvis_ldm

    from ldm import build_ldm

    ckpt, config = write_compvis_ldm(tmp_path, "ldm", compvis_params(), seed=0)
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.diffusion_model.out.2.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan.ckpt: tensor 'model.diffusion_model.out.2.weight' holds NaN"):
        build_ldm("tiny", pretrained=True, num_classes=10, ckpt=tmp_path / "nan.ckpt", compvis_config=config)
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut.ckpt: truncated"):
        build_ldm("tiny", pretrained=True, num_classes=10, ckpt=tmp_path / "cut.ckpt", compvis_config=config)


def test_safetensors_files_say_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, tmp_path / "ok.safetensors")
    assert torch.equal(read_safetensors(tmp_path / "ok.safetensors")["w"], torch.ones(64, 64))
    data = (tmp_path / "ok.safetensors").read_bytes()
    for name, content, problem in (("cut", data[:-1000], "truncated: "), ("empty", b"", "empty file"),
                                   ("junk", os.urandom(2000), "not a safetensors file")):
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError, match=problem):
            read_safetensors(tmp_path / f"{name}.safetensors")


def test_a_legacy_format_checkpoint_still_loads_and_a_truncated_one_is_named(tmp_path):
    state = {"w": torch.arange(1000.0)}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_torch_file(tmp_path / "old.pt")["w"], state["w"])
    (tmp_path / "old_cut.pt").write_bytes((tmp_path / "old.pt").read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=r"old_cut.pt: damaged or truncated"):
        read_torch_file(tmp_path / "old_cut.pt")
