"""One run per folder: an exclusive OS lock on a run folder, held for the whole run.

The lock is `fcntl.flock` on `<folder>/.lock`. The kernel drops it when the process ends in
any way, `kill -9` included, so a killed run never blocks its own resume; a second run into a
folder that a live run holds is refused at once (`FolderBusyError`, exit status 2 in the
scripts) with the holder's pid, host and start time, which the holder writes into the file.

Taken first thing (before the config is checked or a model is built) by the scripts' Hydra
callback (`runs.hydra_callbacks`, before Hydra writes its own files into the folder), and
again, re-entrantly, by `run_from_config` and `train` for callers that do not go through the
scripts. Under torchrun/accelerate rank 0 holds it for all ranks (`claim_folder(..., dist)`).

A clean exit removes the file (while still holding the lock); a killed run leaves a stale one,
which the next run simply locks. A new holder checks that the file it locked is still the one
at the path (a holder that was just removing it may have raced it) and tries again otherwise.
File systems without flock support (some cluster mounts) get a warning and no lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from diffusion.errors import ReportedError, UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class FolderBusyError(UserError):
    """Another live run holds the folder."""


def not_writable(key: str, folder: Path, err: OSError) -> ReportedError:
    """The one message for a run folder that cannot be written (read-only, no permission, full disk)."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        return ReportedError(f"cannot write in {key}={folder}: {reason} (the disk is full): free space and run again")
    return UserError.setting(key, folder, f"cannot write there ({reason}): choose a folder you can write to")


class _Held:
    """An acquired lock: the open lock file (the kernel's lock lives on it) and a nesting count."""

    def __init__(self, folder: Path, fd: int | None, created: bool):
        self.folder, self.fd, self.count, self.thread = folder, fd, 1, threading.get_ident()
        self.created = created  # made by the claim: removed again if the run left it empty
        self.key = folder.resolve()

    def release(self) -> None:
        with _GUARD:
            self.count -= 1
            if self.count:
                return
            _HELD.pop(self.key, None)
            if self.fd is None:
                return
            try:
                (self.folder / LOCK_FILE).unlink(missing_ok=True)  # still holding: no one else can be using it
            except OSError:
                pass
            os.close(self.fd)  # drops the lock
            if self.created:
                try:
                    self.folder.rmdir()  # only if empty: a refused bad setting leaves no trace
                except OSError:
                    pass


_HELD: dict[Path, _Held] = {}
_GUARD = threading.RLock()


def _holder_text(lock_path: Path) -> str:
    """'pid 123 on host, started 2026-01-01 12:00:00 UTC' from the lock file (written by its holder
    right after locking: a fresh holder may not have written it yet, so look a few times)."""
    for _ in range(20):
        try:
            info = json.loads(lock_path.read_text())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return f"its holder did not write {lock_path}"


def _holder_info() -> bytes:
    return json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
    }).encode() + b"\n"


def _lock(folder: Path, key: str) -> _Held:
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise not_writable(key, folder, err) from None
    lock_path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise not_writable(key, folder, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(f"{key}={folder}: in use by another run ({_holder_text(lock_path)}); one run per "
                                  "folder: wait for it to end, or choose another folder") from None
        except OSError as err:  # e.g. ENOLCK/ENOSYS: a file system without flock
            os.close(fd)
            log.warning("%s: file locks are not supported here (%s): running without the one-run-per-folder lock",
                        folder, err.strerror)
            return _Held(folder, None, False)
        try:
            current = os.stat(lock_path)
            mine = os.fstat(fd)
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file we locked: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_info(), 0)
    except OSError as err:
        os.close(fd)
        raise not_writable(key, folder, err) from None
    return _Held(folder, fd, created)


def acquire(folder: str | Path, key: str = "out_dir") -> _Held:
    """Lock folder (created if needed) for this process; re-entrant within one thread.

    Raises FolderBusyError when another process (or another thread of this one) holds it,
    ReportedError/UserError naming the folder when it cannot be written. `.release()` the result.
    """
    folder = Path(folder).absolute()
    with _GUARD:
        held = _HELD.get(folder.resolve())  # one entry however the path is spelled (symlinks)
        if held is not None:
            if held.thread != threading.get_ident():
                raise FolderBusyError(f"{key}={folder}: in use by another run of this process (pid {os.getpid()})")
            held.count += 1
            return held
        held = _lock(folder, key)
        _HELD[held.key] = held
        return held


@contextmanager
def claim_folder(folder: str | Path, key: str = "out_dir", dist=None):
    """Hold the folder's lock for the block. dist (runs.distributed.Dist): rank 0 takes it
    for every rank, and a refusal stops every rank."""
    if dist is None:
        held = acquire(folder, key)
    else:
        box = []  # the handle stays on rank 0
        dist.on_main(lambda: box.append(acquire(folder, key)))
        held = box[0] if box else None
    try:
        yield
    finally:
        if held is not None:
            held.release()
