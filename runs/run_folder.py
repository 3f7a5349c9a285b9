"""The run folder of this process's single run (scripts' Hydra runs): its lock, and what it held before.

runs.hydra_callbacks starts it (`start`) before Hydra writes `.hydra/` and the job log into the folder;
a refusal (`refused`: a UserError, exit status 2, before the run did any work) puts the folder back as it
was: what the run created is removed (the folder itself and its parents, when the run made them), an
existing folder's `.hydra/` record and log are restored, the lock is released. `interrupted` (Ctrl-C)
only releases the lock: the samples written so far stay for a resume.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from runs.folder_lock import LOCK_FILE, acquire

# what a refused run may have written into its folder: Hydra's record, its log, the lock, the resume
# record; anything else means the run did work, and a late refusal then keeps the folder as it is
_SETUP = {".hydra", LOCK_FILE, "samples_config.json"}


class FolderRecord:
    """What a run folder held before a run, so that a refused run can put it back."""

    def __init__(self, folder: Path):
        self.folder = folder.absolute()
        ancestor = self.folder
        while not ancestor.exists() and ancestor.parent != ancestor:
            ancestor = ancestor.parent
        self.made_from = ancestor  # the deepest folder that existed: everything below it is this run's
        existed = self.folder.is_dir()
        self.entries = {p.name for p in self.folder.iterdir()} - {LOCK_FILE} if existed else None
        hydra_dir = self.folder / ".hydra"
        self.hydra = ({p.name: p.read_bytes() for p in hydra_dir.iterdir() if p.is_file()}
                      if existed and hydra_dir.is_dir() else None)
        self.log_sizes = ({p.name: p.stat().st_size for p in self.folder.glob("*.log") if p.is_file()}
                          if existed else {})

    def _new_entries(self) -> set[str]:
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.iterdir()} - (self.entries or set())

    def did_work(self) -> bool:
        """Whether the run wrote more than its set-up (then a refusal keeps what it wrote)."""
        return any(name not in _SETUP and not name.endswith(".log") for name in self._new_entries())

    def restore(self) -> None:
        """Put the folder back as it was (the caller still holds its lock: .lock stays for release())."""
        _close_logs(self.folder)
        for name in self._new_entries() - {LOCK_FILE}:
            path = self.folder / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()
        hydra_dir = self.folder / ".hydra"
        if self.hydra is not None:
            for path in hydra_dir.iterdir() if hydra_dir.is_dir() else ():
                if path.is_file() and path.name not in self.hydra:
                    path.unlink()
            for name, data in self.hydra.items():
                path = hydra_dir / name
                if not path.is_file() or path.read_bytes() != data:
                    hydra_dir.mkdir(exist_ok=True)
                    path.write_bytes(data)
        for name, size in self.log_sizes.items():
            path = self.folder / name
            if path.is_file() and path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)

    def remove_made_folders(self) -> None:
        """rmdir the folders the run made (run folder included), deepest first, while they are empty."""
        path = self.folder
        while path != self.made_from and path.is_relative_to(self.made_from):
            try:
                if path.exists():
                    path.rmdir()
            except OSError:
                return
            path = path.parent


def _close_logs(folder: Path) -> None:
    """Close the logging file handlers that write into folder (Hydra's job log), so that nothing more is
    written there."""
    import logging

    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]:
        for handler in list(getattr(logger, "handlers", [])):
            name = getattr(handler, "baseFilename", None)
            if name and Path(name).parent == folder:
                logger.removeHandler(handler)
                handler.close()


class _Run:
    """The single run in progress in this process: its folder's lock and record."""

    def __init__(self, folder: Path, key: str):
        self.record = FolderRecord(folder)
        self.held = acquire(folder, key)

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None

    def undo(self) -> None:
        """A refused run: the folder as it was, the lock released."""
        if self.held is None:
            return
        if not self.record.did_work():
            self.record.restore()
        self.release()
        self.record.remove_made_folders()


_ACTIVE: _Run | None = None


def refused() -> None:
    """The run was refused (a UserError in the job): leave its folder as it was before the run."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.undo()
        _ACTIVE = None


def interrupted() -> Path | None:
    """The run was stopped (Ctrl-C): release its folder (its samples stay for a resume); the folder."""
    global _ACTIVE
    if _ACTIVE is None:
        return None
    run, _ACTIVE = _ACTIVE, None
    run.release()
    return run.record.folder


def start(folder: Path, key: str) -> Path:
    """Note what folder holds, then lock it for this run (created if needed); the folder, absolute."""
    global _ACTIVE
    _ACTIVE = _Run(folder, key)
    return _ACTIVE.record.folder


def finished() -> None:
    """The run ended (done or failed under way): release the folder, keep what it holds."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.release()
        _ACTIVE = None
