"""One run per folder (runs/folder_lock.py): two concurrent runs never mix, the second is refused
at once with one `error:` line naming the folder and the holder; a killed holder releases it."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from runs.folder_lock import LOCK_FILE, FolderBusyError, acquire, claim_folder
from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=6", "progress=false", "num_threads=1",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
HOLDER = ("import sys, time; from runs.folder_lock import acquire; acquire(sys.argv[1]); "
          "print('held', flush=True); time.sleep(600)")


def _hold_in_another_process(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


def test_a_folder_held_by_a_live_process_is_refused_and_freed_by_kill_9(tmp_path):
    holder = _hold_in_another_process(tmp_path)
    try:
        with pytest.raises(FolderBusyError) as err:
            acquire(tmp_path, "hydra.run.dir")
        message = str(err.value)
        assert message.startswith(f"hydra.run.dir={tmp_path}: in use by another run (pid {holder.pid} on "
                                  f"{socket.gethostname()}, started 20")
        assert err.value.exit_code == 2 and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()  # the killed holder's file is left, its lock died with it
    held = acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()  # the new holder's details
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()  # a clean release removes the file


def test_the_lock_nests_in_one_thread_and_refuses_another_thread(tmp_path):
    folder = tmp_path / "run"
    (tmp_path / "link").symlink_to(tmp_path)
    with claim_folder(folder):
        with claim_folder(folder):  # run_from_config inside the scripts' claim
            pass
        with claim_folder(tmp_path / "link" / "run"):  # the same folder spelled through a symlink
            pass
        assert (folder / LOCK_FILE).is_file()  # still held by the outer claim
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(FolderBusyError, acquire, folder)))
        thread.start()
        thread.join()
        assert "in use by another run of this process" in str(errors[0].value)
    assert not folder.exists()  # made by the claim, left empty: removed


def test_run_from_config_refuses_a_folder_in_use(compose_sample, tmp_path):
    holder = _hold_in_another_process(tmp_path)
    try:
        with pytest.raises(FolderBusyError, match=f"out_dir={tmp_path}: in use by another run \\(pid {holder.pid} "):
            run_from_config(compose_sample(*DIGITS, "num_samples=2", "batch_size=2"), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing written


def _sample_cmd(folder, *args):
    return [sys.executable, "tests/script_faults.py", "scripts/sample.py", *DIGITS, *args, f"hydra.run.dir={folder}"]


def test_two_concurrent_runs_into_one_folder_do_not_mix(compose_sample, tmp_path):
    """Item 1 of issue 18: two runs started together into one folder (other seeds, other sizes). Each
    waits before sampling until `go` exists, so the winner holds the folder while the other starts.
    The other is refused at once (exit 2, one line naming the folder and the holder), before it
    writes anything there; the folder then holds the winner's samples only, equal to a clean run."""
    folder, go = tmp_path / "run", tmp_path / "go"
    settings = {0: ["seed=0", "num_samples=6", "batch_size=2"], 1: ["seed=1", "num_samples=4", "batch_size=2"]}
    env = {**ENV, "FAULT_WAIT_FOR": str(go)}
    procs = {k: subprocess.Popen(_sample_cmd(folder, *args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, args in settings.items()}
    try:
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        (loser,) = [k for k, p in procs.items() if p.poll() is not None]
        (winner,) = [k for k in procs if k != loser]
        _, err = procs[loser].communicate()
        assert procs[loser].returncode == 2, err[-3000:]
        holder = json.loads((folder / LOCK_FILE).read_text())
        assert holder["pid"] == procs[winner].pid
        assert err.strip().splitlines() == [
            f"error: hydra.run.dir={folder}: in use by another run (pid {procs[winner].pid} on {holder['host']}, "
            f"started {holder['started']}); one run per folder: wait for it to end, or choose another folder"]
        assert "Traceback" not in err
        go.touch()
        _, err = procs[winner].communicate(timeout=240)
        assert procs[winner].returncode == 0, err[-3000:]
    finally:
        go.touch()
        for p in procs.values():
            p.kill()
            p.wait()
    n = int(settings[winner][1].split("=")[1])
    assert json.loads((folder / "samples_config.json").read_text())["seed"] == winner
    assert f"seed: {winner}" in (folder / ".hydra" / "config.yaml").read_text()  # the refused run wrote nothing
    assert json.loads((folder / "done").read_text())["num_samples"] == n
    clean = tmp_path / "clean"
    run_from_config(compose_sample(*DIGITS, *settings[winner]), clean)
    assert _pngs(folder) == _pngs(clean) and len(_pngs(folder)) == n
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(np.load(folder / "samples.npz")[key], np.load(clean / "samples.npz")[key])
    assert not (folder / LOCK_FILE).exists()


def test_torchrun_ranks_share_one_lock(compose_sample, tmp_path):
    """Under torchrun rank 0 locks the folder for all ranks: two ranks into one explicit folder run
    (if each rank locked it, rank 1 would be refused), and write the images of one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "scripts/sample.py", *DIGITS, "num_samples=4", "batch_size=1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_from_config(compose_sample(*DIGITS, "num_samples=4", "batch_size=1"), tmp_path / "single")
    assert _pngs(tmp_path / "run") == _pngs(tmp_path / "single")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
