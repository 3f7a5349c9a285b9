"""A refused run leaves no trace (issue 28): each refusal is one `error:` line naming the key as typed,
exit status 2, and the file system as it was (every file's hash and every folder compared before and
after); a sweep with one bad value starts no job; Ctrl-C is one line, exit status 130, no `.lock`."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS

ROOT = CONFIGS.parent
FAST = ["+exp=digits_stitch_0.4", "num_samples=10", "batch_size=10", "sampler.steps=4", "progress=false"]


def _tree(folder: Path) -> dict[str, str | None]:
    """Every file (its sha256) and folder (None) under folder."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "HF_HUB_CACHE": str(tmp_path / "hub_cache"), "TORCH_HOME": str(tmp_path / "torch_home"), **extra}


def _run(script: str, args: list[str], cwd: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=_env(tmp_path, **env))


def _refused(proc: subprocess.CompletedProcess, start: str) -> str:
    """The one `error:` line (starting with `start`) of a refusal with exit status 2, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


# the table's rows 1, 3-6 and 9: the command as a new user types it (default run folder under the cwd)
CASES = {
    "row1_bad_setting": (FAST + ["accel.tstitch.ratio=1.5"], "error: accel.tstitch.ratio=1.5: "),
    "row3_missing_ckpt": (FAST + ["model.ckpt=missing/nope.pt"], "error: model.ckpt=missing/nope.pt: no such file"),
    "row3_folder_ckpt": (FAST + ["model.ckpt={tmp}"], "error: model.ckpt={tmp}: a folder, not a checkpoint"),
    "row4_negative_seed": (FAST + ["seed=-1", "labels=null"], "error: seed=-1: must be an integer in [0, "),
    "row4_negative_seed_labels": (FAST + ["seed=-1"], "error: seed=-1: must be an integer in [0, "),
    "row4_huge_seed": (FAST + ["seed=99999999999999999999"], "error: seed=99999999999999999999: "),
    "row5_device": (FAST + ["device=tpu"], "error: device=tpu: not a device; allowed: auto, cpu, cuda"),
    "row6_hub": (["+exp=sd35_stitch_0.4"], "error: accel.models.small.source=stabilityai/stable-diffusion-3.5"),
    "row6_no_arguments": ([], "error: model.ckpt=null (the release file DiT-XL-2-256x256.pt): not on this machine"),
    "row9_other_checkpoint": (FAST + ["model.ckpt=checkpoints/digits/digits_s.pt"],
                              "error: model.ckpt=checkpoints/digits/digits_s.pt: does not match the model"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_refused_run_is_one_line_and_leaves_no_trace(case, tmp_path):
    cwd = tmp_path / "elsewhere"  # not the repository: relative shipped paths must still be found
    cwd.mkdir()
    args, start = CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = _tree(tmp_path)
    line = _refused(_run("sample.py", args, cwd, tmp_path), start.replace("{tmp}", str(tmp_path)))
    assert _tree(tmp_path) == before
    if case.startswith("row6"):  # every model the run needs, and how to make them local
        needed = (["stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large"]
                  if case == "row6_hub" else ["DiT-XL-2-256x256.pt", "stabilityai/sd-vae-ft-mse"])
        assert all(name in line for name in needed) and "huggingface-cli download" in line, line
    if case == "row9_other_checkpoint":  # cut to one key per layer kind
        assert len(line) < 700, line


def test_a_refused_rerun_leaves_the_folder_and_its_record_as_they_were(tmp_path):
    """Row 2 (and row 3's main job started outside the repository): a finished run into D, then refused
    reruns into D leave every file of D as it was, `.hydra/` included."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    folder = tmp_path / "D"
    done = _run("sample.py", FAST + [f"hydra.run.dir={folder}"], cwd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / "done").is_file() and not (folder / ".lock").exists()
    before = _tree(tmp_path)
    _refused(_run("sample.py", FAST + ["precision=bf16", f"hydra.run.dir={folder}"], cwd, tmp_path),
             f"error: {folder} holds samples of another config (precision: ")
    assert _tree(tmp_path) == before
    _refused(_run("sample.py", FAST + ["device=tpu", f"hydra.run.dir={folder}"], cwd, tmp_path), "error: device=tpu")
    assert _tree(tmp_path) == before


def test_a_sweep_with_one_bad_value_starts_no_job(tmp_path):
    """Row 8: every job's config is checked before the first job starts."""
    before = _tree(tmp_path)
    proc = _run("sample.py", ["-m", *FAST, "accel.tstitch.ratio=0.4,1.5"], tmp_path, tmp_path)
    _refused(proc, "error: accel.tstitch.ratio=1.5: ")
    assert "Launching" not in proc.stdout + proc.stderr
    assert _tree(tmp_path) == before


def test_bench_peers_checks_every_model_and_setting_first(tmp_path):
    """Row 7: a bad model name or setting is refused before the first measurement, naming the key typed."""
    before = _tree(tmp_path)
    args = ["image_size=32", "repeats=1", "warmup=0", "device=cpu"]
    _refused(_run("bench_peers.py", ["models=[DiT-S/2,DiT-Q/9]", *args], tmp_path, tmp_path),
             "error: models=[DiT-S/2, DiT-Q/9]: unknown DiT model DiT-Q/9; allowed: ")
    _refused(_run("bench_peers.py", ["steps=0", *args], tmp_path, tmp_path), "error: steps=0: ")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("grids, start", [
    ("[{fractions: abc, gates: [null]}]", "error: grids[0].fractions=abc: "),
    ("[{fractions: [1.5], gates: [null]}]", "error: grids[0].fractions[0]=1.5: "),
    ("[{fractions: [0.4], gates: [{gate_step: -4}]}]", "error: grids[0].gates[0].gate_step=-4: "),
])
def test_frontier_names_the_grid_key(grids, start, tmp_path):
    """Row 9: frontier.py's grid errors name the key as typed."""
    before = _tree(tmp_path)
    _refused(_run("frontier.py", [f"grids={grids}"], tmp_path, tmp_path), start)
    assert _tree(tmp_path) == before


def test_ctrl_c_is_one_line_exit_130_and_releases_the_folder(tmp_path):
    """Row 10: SIGINT mid-run: one line with the resume command, exit status 130, no `.lock` left."""
    folder = tmp_path / "D"
    command = [sys.executable, str(ROOT / "scripts" / "sample.py"), "+exp=digits_stitch_0.4", "num_samples=40",
               "batch_size=10", "sampler.steps=400", "progress=false", f"hydra.run.dir={folder}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=_env(tmp_path), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # Hydra logs to stdout
            if "sampling " in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (Ctrl-C)"), err[-3000:]
    assert f"hydra.run.dir={folder}" in lines[0] and "Traceback" not in err
    assert not (folder / ".lock").exists() and (folder / ".hydra").is_dir()
