"""A refused run leaves no trace (issue 28): each refusal is one `error:` line naming the key as typed,
exit status 2, and the file system as it was (every file's hash and every folder compared before and
after); a sweep with one bad value starts no job; Ctrl-C is one line, exit status 130, no `.lock`."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS
from script_runner import run_in_one_process

ROOT = CONFIGS.parent
FAST = ["+exp=digits_stitch_0.4", "num_samples=10", "batch_size=10", "sampler.steps=4", "progress=false"]


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "HF_HUB_CACHE": str(tmp_path / "hub_cache"), "TORCH_HOME": str(tmp_path / "torch_home"), **extra}


def _refused(result: dict, start: str) -> str:
    """The one `error:` line (starting with `start`) of a refusal with exit status 2, no traceback, and
    no file or folder added, removed or changed."""
    err = result["stderr"]
    assert result["code"] == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start), err[-3000:]
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    assert result["changed"] == [], result["changed"]
    return errors[0]


# the table's rows 1, 3-6 and 9: the command as a new user types it (the default run folder, under a
# working directory that is not the repository: shipped relative paths must still be found)
CASES = {
    "row1_bad_setting": (FAST + ["accel.tstitch.ratio=1.5"], "error: accel.tstitch.ratio=1.5: "),
    "row3_missing_ckpt": (FAST + ["model.ckpt=missing/nope.pt"], "error: model.ckpt=missing/nope.pt: no such file"),
    "row3_folder_ckpt": (FAST + ["model.ckpt={tmp}"], "error: model.ckpt={tmp}: a folder, not a checkpoint"),
    "row4_negative_seed": (FAST + ["seed=-1", "labels=null"], "error: seed=-1: must be an integer in [0, "),
    "row4_negative_seed_labels": (FAST + ["seed=-1"], "error: seed=-1: must be an integer in [0, "),
    "row4_huge_seed": (FAST + ["seed=99999999999999999999"], "error: seed=99999999999999999999: "),
    "row5_device": (FAST + ["device=tpu"], "error: device=tpu: not a device; allowed: auto, cpu, cuda"),
    "row6_hub": (["+exp=sd35_stitch_0.4"], "error: family.stitch.small.source=stabilityai/stable-diffusion-3.5"),
    "row6_no_arguments": ([], "error: model.ckpt=null (the release file DiT-XL-2-256x256.pt): not on this machine"),
    "row9_other_checkpoint": (FAST + ["model.ckpt=checkpoints/digits/digits_s.pt"],
                              "error: model.ckpt=checkpoints/digits/digits_s.pt: does not match the model"),
}
BENCH = ["image_size=32", "repeats=1", "warmup=0", "device=cpu"]
OTHER = {  # script, arguments, start of the line
    "row7_bench_peers_model": ("bench_peers.py", ["models=[DiT-S/2,DiT-Q/9]", *BENCH],
                               "error: models=[DiT-S/2, DiT-Q/9]: unknown DiT model DiT-Q/9; allowed: "),
    "row7_bench_peers_steps": ("bench_peers.py", ["steps=0", *BENCH], "error: steps=0: must be an integer >= 1"),
    "row7_bench_peers_ratio": ("bench_peers.py", ["ratio=2", *BENCH], "error: ratio=2: "),
    "row8_sweep": ("sample.py", ["-m", *FAST, "accel.tstitch.ratio=0.4,1.5"], "error: accel.tstitch.ratio=1.5: "),
    "row9_frontier_abc": ("frontier.py", ["grids=[{fractions: abc, gates: [null]}]"],
                          "error: grids[0].fractions=abc: must be a list of numbers"),
    "row9_frontier_fraction": ("frontier.py", ["grids=[{fractions: [1.5], gates: [null]}]"],
                               "error: grids[0].fractions[0]=1.5: "),
    "row9_frontier_gate": ("frontier.py", ["grids=[{fractions: [0.4], gates: [{gate_step: -4}]}]"],
                           "error: grids[0].gates[0].gate_step=-4: "),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case run once, in one process (tests/script_runner.py): {case: result}."""
    tmp = tmp_path_factory.mktemp("refusals")
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    cases, names = [], []

    def add(name, script, args):
        names.append(name)
        cases.append({"script": str(ROOT / "scripts" / script), "args": [a.replace("{tmp}", str(tmp)) for a in args],
                      "cwd": str(cwd), "root": str(tmp)})

    for name, (args, _) in CASES.items():
        add(name, "sample.py", args)
    for name, (script, args, _) in OTHER.items():
        add(name, script, args)
    # row 2 (and row 3's main job started outside the repository): a finished run into D, then refused reruns
    folder = tmp / "D"
    add("row2_done", "sample.py", FAST + [f"hydra.run.dir={folder}"])
    add("row2_precision", "sample.py", FAST + ["precision=bf16", f"hydra.run.dir={folder}"])
    add("row2_ratio", "sample.py", FAST + ["accel.tstitch.ratio=0.7", f"hydra.run.dir={folder}"])
    add("row2_device", "sample.py", FAST + ["device=tpu", f"hydra.run.dir={folder}"])
    out = run_in_one_process(cases, _env(tmp))
    return {"tmp": tmp, **dict(zip(names, out, strict=True))}


@pytest.mark.parametrize("case", CASES)
def test_a_refused_run_is_one_line_and_leaves_no_trace(case, results):
    start = CASES[case][1].replace("{tmp}", str(results["tmp"]))
    line = _refused(results[case], start)
    if case.startswith("row6"):  # every model the run needs, and how to make them local
        needed = (["stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large"]
                  if case == "row6_hub" else ["DiT-XL-2-256x256.pt", "stabilityai/sd-vae-ft-mse"])
        assert all(name in line for name in needed) and "huggingface-cli download" in line, line
    if case == "row9_other_checkpoint":  # cut to one key per layer kind
        assert len(line) < 700, line


@pytest.mark.parametrize("case", OTHER)
def test_benchmarks_and_sweeps_check_everything_before_the_first_job(case, results):
    """Rows 7-9: bench_peers and frontier settings, and every job of a sweep, refused before any work."""
    _refused(results[case], OTHER[case][2])
    if case == "row8_sweep":
        assert "Launching" not in results[case]["stdout"] + results[case]["stderr"]


def test_a_refused_rerun_leaves_the_folder_and_its_record_as_they_were(results):
    """Row 2: refused reruns into a finished folder leave every file of it as it was, `.hydra/` included;
    the first run, started outside the repository, found the shipped checkpoints (row 3)."""
    done = results["row2_done"]
    assert done["code"] == 0, done["stderr"][-3000:]
    folder = results["tmp"] / "D"
    assert (folder / "done").is_file() and not (folder / ".lock").exists()
    _refused(results["row2_precision"], f"error: hydra.run.dir={folder}: holds samples of another config (precision: ")
    _refused(results["row2_ratio"], f"error: hydra.run.dir={folder}: holds samples of another config (")
    _refused(results["row2_device"], "error: device=tpu")


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
