"""scripts/train.py's loop: the loss falls, checkpoints round-trip, resume continues exactly."""
import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from data.datasets import DigitsDataset
from training.checkpointing import load_train_state
from training.losses import DiffusionLoss
from training.train import train

from conftest import CONFIGS

ROOT = CONFIGS.parent
# a one-block digits DiT (~40K parameters): a training step takes milliseconds
TINY = ["model.arch={depth:1,hidden_size:32,num_heads:2,patch_size:2}", "batch_size=32", "lr=1e-3",
        "ema_decay=0.9", "progress=false", "log_every=5", "num_threads=1"]


@pytest.fixture
def compose_train():
    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="train", overrides=TINY + list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def _fixed_batch_loss(model_state, cfg) -> float:
    """Loss of a model on 256 real digits with fixed t and noise (the same for every call)."""
    from dit import build_dit

    arch = dict(cfg.model.arch)
    model = build_dit("tiny", input_size=8, num_classes=10, in_channels=1, arch=arch)
    model.load_state_dict(model_state)
    data = DigitsDataset()
    gen = torch.Generator().manual_seed(123)
    x, y = data.images[:256], data.labels[:256]
    t = torch.randint(0, 1000, (256,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        return DiffusionLoss()(model, x, t, noise, y=y)["loss"].mean().item()


def test_a_few_training_steps_reduce_the_loss(compose_train, tmp_path):
    cfg = compose_train("steps=40", "ckpt_every=40")
    torch.manual_seed(cfg.seed)
    from runs.run import build_denoiser

    initial = build_denoiser(cfg.model, 8, pretrained=False, device="cpu").state_dict()
    summary = train(cfg, tmp_path)
    final = load_train_state(tmp_path / "checkpoints" / "0000040.pt")
    before, after = _fixed_batch_loss(initial, cfg), _fixed_batch_loss(final["model"], cfg)
    assert after < 0.7 * before, (before, after)
    assert summary["loss_history"][-1][1] < summary["loss_history"][0][1]
    assert json.loads((tmp_path / "train_metrics.json").read_text())["steps"] == 40


def test_checkpoint_round_trips_in_the_official_layout(compose_train, tmp_path):
    from dit import build_dit, load_checkpoint_state_dict

    cfg = compose_train("steps=3", "ckpt_every=3", f"export={tmp_path / 'export.pt'}")
    train(cfg, tmp_path)
    state = load_train_state(tmp_path / "checkpoints" / "0000003.pt")
    assert set(state) == {"model", "ema", "opt", "config", "step", "losses"} and state["step"] == 3
    assert state["config"]["model"]["arch"]["hidden_size"] == 32 and state["config"]["lr"] == 1e-3
    # no temporary files left next to the checkpoints (written under a temporary name, then renamed)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000003.pt"]
    # dit.checkpoints reads the EMA weights of both the checkpoint and the export, with weights_only
    for path in (tmp_path / "checkpoints" / "0000003.pt", tmp_path / "export.pt"):
        loaded = load_checkpoint_state_dict(path)
        assert all(torch.equal(loaded[k], v) for k, v in state["ema"].items())
    model = build_dit("tiny", input_size=8, num_classes=10, in_channels=1, arch=dict(cfg.model.arch),
                      ckpt=tmp_path / "export.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["ema"].items())
    export = torch.load(tmp_path / "export.pt", weights_only=True)
    assert set(export) == {"ema", "config", "step"} and export["step"] == 3


def test_resume_continues_from_the_saved_step(compose_train, tmp_path):
    """Interrupted at step 2 and resumed, the run ends bit for bit where the uninterrupted one does."""
    train(compose_train("steps=4", "ckpt_every=2"), tmp_path / "straight")
    train(compose_train("steps=2", "ckpt_every=2"), tmp_path / "cut")
    summary = train(compose_train("steps=4", "ckpt_every=2", f"resume={tmp_path / 'cut/checkpoints/0000002.pt'}"),
                    tmp_path / "cut")
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    a = load_train_state(tmp_path / "straight/checkpoints/0000004.pt")
    b = load_train_state(tmp_path / "cut/checkpoints/0000004.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    steps = [float(next(iter(s["opt"]["state"].values()))["step"]) for s in (a, b)]
    assert steps == [4.0, 4.0]  # AdamW's own step count came back with the optimiser state
    # resume=latest finds the newest checkpoint of the run folder
    summary = train(compose_train("steps=6", "ckpt_every=2", "resume=latest"), tmp_path / "cut")
    assert summary["resumed_from"] == 4 and (tmp_path / "cut/checkpoints/0000006.pt").is_file()


def test_resume_refuses_what_is_not_a_training_checkpoint(compose_train, tmp_path):
    train(compose_train("steps=1", f"export={tmp_path / 'export.pt'}"), tmp_path / "a")
    with pytest.raises(ValueError, match="cannot resume from it, it lacks"):
        train(compose_train("steps=2", f"resume={tmp_path / 'export.pt'}"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(compose_train("steps=2", f"resume={tmp_path / 'nope.pt'}"), tmp_path / "c")


@pytest.mark.parametrize("override,message", [
    ("steps=0", r"steps=0: must be an integer >= 1"),
    ("ema_decay=1.0", r"ema_decay=1.0: must be in \[0, 1\)"),
    ("model.image_size=16", r"the data set makes 8px images, model.image_size=16"),
    ("model.num_classes=5", r"the data set has 10 classes, model.num_classes=5"),
])
def test_bad_settings_are_refused(compose_train, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(compose_train(override), tmp_path)


# slow (a script run); test_a_killed_training_run_resumes_to_the_same_weights_and_history runs
# scripts/train.py from the command line in the default run
@pytest.mark.slow
def test_train_script_from_the_command_line(tmp_path):
    cmd = [sys.executable, "scripts/train.py", *TINY, "steps=2", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "0000002.pt").is_file() and (tmp_path / "train_metrics.json").is_file()


def test_resume_keeps_the_loss_history(compose_train, tmp_path):
    """Item 8 of issue 18: train_metrics.json after resume=latest holds the whole history, equal to
    the uninterrupted run's (the cut at step 3 falls inside a log window of 2 steps)."""
    straight = train(compose_train("steps=6", "ckpt_every=3", "log_every=2"), tmp_path / "straight")
    train(compose_train("steps=3", "ckpt_every=3", "log_every=2"), tmp_path / "cut")
    resumed = train(compose_train("steps=6", "ckpt_every=3", "log_every=2", "resume=latest"), tmp_path / "cut")
    assert resumed["resumed_from"] == 3
    assert [s for s, _ in straight["loss_history"]] == [2, 4, 6]
    assert resumed["loss_history"] == straight["loss_history"]
    saved = json.loads((tmp_path / "cut" / "train_metrics.json").read_text())["loss_history"]
    assert saved == [list(x) for x in straight["loss_history"]]


def test_checkpoints_without_the_history_take_it_from_train_metrics(compose_train, tmp_path):
    """Checkpoints written before they kept the history: the run's train_metrics.json supplies it."""
    first = train(compose_train("steps=4", "ckpt_every=4", "log_every=2"), tmp_path)
    path = tmp_path / "checkpoints" / "0000004.pt"
    state = torch.load(path, weights_only=True)
    del state["losses"]
    torch.save(state, path)
    resumed = train(compose_train("steps=6", "ckpt_every=2", "log_every=2", "resume=latest"), tmp_path)
    assert resumed["loss_history"][:2] == [tuple(x) for x in first["loss_history"]]
    assert [s for s, _ in resumed["loss_history"]] == [2, 4, 6]


def test_a_killed_training_run_resumes_to_the_same_weights_and_history(compose_train, tmp_path):
    """kill -9 right after the checkpoint of step 4 (no cleanup runs, the folder lock dies with the
    process); `resume=latest` ends bit for bit where an uninterrupted run does, loss history included."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*TINY, "steps=6", "ckpt_every=2", "log_every=3", f"hydra.run.dir={tmp_path / 'cut'}"]
    killed = subprocess.run([sys.executable, "tests/script_faults.py", "scripts/train.py", *args], cwd=ROOT,
                            env={**env, "FAULT_KILL_AFTER_CHECKPOINT": "4"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]
    assert (tmp_path / "cut" / ".lock").is_file()  # left by the killed run; its lock died with it
    resumed = train(compose_train("steps=6", "ckpt_every=2", "log_every=3", "resume=latest"), tmp_path / "cut")
    assert resumed["resumed_from"] == 4
    straight = train(compose_train("steps=6", "ckpt_every=2", "log_every=3"), tmp_path / "straight")
    a = load_train_state(tmp_path / "straight/checkpoints/0000006.pt")
    b = load_train_state(tmp_path / "cut/checkpoints/0000006.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    history = json.loads((tmp_path / "cut" / "train_metrics.json").read_text())["loss_history"]
    assert history == [list(x) for x in straight["loss_history"]] and [s for s, _ in history] == [3, 6]
