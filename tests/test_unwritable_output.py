"""A read-only output folder and a full disk give one clear line naming the path (item 7 of issue 18),
not Hydra's logging traceback or a bare ENOSPC; nothing already written is lost.

The folders are made read-only, and the disk full, for real where the system allows it: inside a
user and mount namespace (`unshare -rm`, no root needed on most Linux systems) a read-only bind
mount (EROFS, which binds root too) and a 1 MB tmpfs. Elsewhere: chmod (or chattr +i as root) and
an injected ENOSPC.
"""
import errno
import functools
import os
import shutil
import subprocess
import sys

import pytest

from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=4", "progress=false", "num_threads=1", "batch_size=2",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SAMPLE = [sys.executable, "scripts/sample.py", *DIGITS]
# sh -c SCRIPT FOLDER COMMAND...: make FOLDER read-only (a read-only bind mount of itself), then run COMMAND
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
# mount a 1 MB tmpfs on FOLDER, run COMMAND, then list FOLDER/run (the tmpfs ends with the namespace)
SMALL_DISK = 'mount -t tmpfs -o size=1m tmpfs "$0" && "$@"; rc=$?; echo ==files==; ls -a "$0/run"; exit $rc'


@functools.cache
def namespaces() -> bool:
    """Whether this system lets us mount inside a user namespace."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', "/tmp"], capture_output=True)
    return probe.returncode == 0


def _run(cmd, folder=None, script=None, env=None):
    if script is not None:
        cmd = ["unshare", "-rm", "sh", "-c", script, str(folder), *cmd]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def _read_only(folder):
    """Make folder read-only without namespaces; returns a function that undoes it."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return lambda: folder.chmod(0o755)
    probe.unlink()  # root ignores the mode bits: an immutable folder instead
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.fail("cannot make a read-only folder here (no user namespaces, root without chattr)")
    return lambda: (subprocess.run(["chattr", "-i", str(folder)]), folder.chmod(0o755))


def _run_read_only(cmd, folder):
    if namespaces():
        return _run(cmd, folder, READ_ONLY)
    undo = _read_only(folder)
    try:
        return _run(cmd)
    finally:
        undo()


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(proc, status):
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_read_only_run_folder_is_one_clear_error_and_loses_nothing(compose_sample, tmp_path):
    folder = tmp_path / "run"
    run_from_config(compose_sample(*DIGITS, "num_samples=2"), folder)  # a finished run, resumed below for more
    before = _files(folder)
    proc = _run_read_only([*SAMPLE, "num_samples=4", f"hydra.run.dir={folder}"], folder)
    line = _one_error_line(proc, 2)
    assert line.startswith(f"error: hydra.run.dir={folder}: cannot write there (")
    assert line.endswith("): choose a folder you can write to")
    assert "Unable to configure handler" not in proc.stderr + proc.stdout
    assert _files(folder) == before


def test_a_run_folder_under_a_read_only_folder_and_a_read_only_sweep(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    proc = _run_read_only([*SAMPLE, "num_samples=2", f"hydra.run.dir={parent / 'new'}"], parent)
    assert _one_error_line(proc, 2).startswith(f"error: hydra.run.dir={parent / 'new'}: cannot write there (")
    multirun = [sys.executable, "scripts/sample.py", "-m", *DIGITS, "num_samples=2", "seed=0,1"]
    proc = _run_read_only([*multirun, f"hydra.sweep.dir={parent / 'sweep'}"], parent)
    assert _one_error_line(proc, 2).startswith(f"error: hydra.sweep.dir={parent / 'sweep'}: cannot write there (")
    assert list(parent.iterdir()) == []


def test_a_full_disk_is_one_clear_error_naming_the_file(tmp_path):
    """The disk fills up before the second batch's PNGs are written: the run stops with one line
    naming that PNG; the first batch stays, no temporary is left, the folder is not marked done."""
    cmd = [sys.executable, "tests/script_faults.py", "scripts/sample.py", *DIGITS, "num_samples=6"]
    if namespaces():
        disk = tmp_path / "disk"
        disk.mkdir()
        folder = disk / "run"
        proc = _run([*cmd, f"hydra.run.dir={folder}"], disk, SMALL_DISK,
                    env={"FAULT_FILL_AT_BATCH": "2", "FAULT_FILL_PATH": str(disk / "filler")})
        files = proc.stdout.split("==files==")[-1].split()
    else:
        folder = tmp_path / "run"
        proc = _run([*cmd, f"hydra.run.dir={folder}"], env={"FAULT_ENOSPC_AT_BATCH": "2"})
        files = [p.name for p in folder.iterdir()]
    line = _one_error_line(proc, 1)
    assert line == (f"error: cannot write {folder / '000002.png'}: {os.strerror(errno.ENOSPC)} (the disk is full: "
                    "free space, then run the same command again (it resumes))")
    assert {"000000.png", "000001.png"} <= set(files)
    assert not {"000002.png", "000003.png", "done", "samples.npz"} & set(files)
    assert not [f for f in files if ".tmp" in f]
