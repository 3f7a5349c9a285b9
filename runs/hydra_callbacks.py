"""Hydra callback of the scripts (configs/sample.yaml, train.yaml: `hydra.callbacks.run_folder`).

Hydra writes into the run folder (`.hydra/`, the job's log file) inside run_job, after
`on_run_start` / `on_multirun_start`. This callback acts before that:

* single run: rank 0 locks `hydra.run.dir` (runs.folder_lock), so a second run into a folder in
  use is refused before it writes anything there, notes what the folder holds (`FolderRecord`), and
  runs the script's checks (`check`, e.g. runs.preflight.check_sample_run) under the lock. A refusal,
  now or later in the job (a UserError: exit status 2), puts the folder back as it was: what the run
  created is removed (the folder itself, and its parents, when the run made them), an existing
  folder's `.hydra/` record and log are restored, and the lock is released. The other ranks of a
  torchrun job leave `.hydra/` to rank 0;
* multirun: every job's config is composed and checked before the first job starts (a sweep with one
  bad value starts nothing); then the sweep folder must be writable (each job locks its own folder
  in the job).

Refusals print `error: ...` and exit (Hydra would only turn a callback's exception into a warning).
"""
from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffusion.errors import ReportedError, exit_with, full_errors
from runs.distributed import dist_from_env
from runs.folder_lock import LOCK_FILE, acquire, not_writable

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


def _check(check: str | None, config: DictConfig, folder: Path | None) -> None:
    if check:
        from runs.preflight import job_config

        get_method(check)(job_config(config), folder)


def _refuse(err: Exception, undo=None) -> None:
    """End the process on a refusal met by the callback: one `error:` line (HYDRA_FULL_ERROR=1: traceback)."""
    from runs.script import composition_error, job_error

    reported = composition_error(err) or job_error(err)
    if reported is None:  # a bug: Hydra warns, and the job meets it again with its traceback
        raise err
    if undo is not None:
        undo()
    if full_errors():
        traceback.print_exception(err)
        raise SystemExit(reported.exit_code)
    exit_with(reported)


class RunFolderCallback(Callback):
    """check: dotted name of `check(cfg, folder)`, the script's checks before any work (None: none)."""

    def __init__(self, check: str | None = None) -> None:
        self.check = check

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _ACTIVE
        HydraConfig.instance().set_config(config)  # as run_job does next: ${hydra:...} resolves the same
        if not dist_from_env().is_main:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
            return
        try:
            _ACTIVE = _Run(Path(OmegaConf.select(config, "hydra.run.dir")), "hydra.run.dir")
        except ReportedError as err:
            exit_with(err)
        try:
            _check(self.check, config, _ACTIVE.record.folder)
        except Exception as err:
            _refuse(err, refused)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        global _ACTIVE
        if _ACTIVE is not None:
            _ACTIVE.release()
            _ACTIVE = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if self.check:
            try:
                for job, overrides in enumerate(sweep_jobs(config)):
                    job_cfg = _job_config(config, overrides, job)
                    folder = Path(OmegaConf.select(job_cfg, "hydra.sweep.dir")) / str(job_cfg.hydra.sweep.subdir)
                    _check(self.check, job_cfg, folder if folder.is_dir() else None)
            except Exception as err:
                _refuse(err)
            finally:
                HydraConfig.instance().set_config(config)
        folder = Path(OmegaConf.select(config, "hydra.sweep.dir")).absolute()
        probe = folder / f".write_test{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            exit_with(not_writable("hydra.sweep.dir", folder, err))


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of each job of the sweep, as Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _job_config(config: DictConfig, overrides: list[str], num: int) -> DictConfig:
    """A sweep job's config, composed as the basic launcher composes it (with its hydra.job.num)."""
    from hydra.core.global_hydra import GlobalHydra

    job_cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(job_cfg):
        job_cfg.hydra.job.id = job_cfg.hydra.job.num = num
    HydraConfig.instance().set_config(job_cfg)
    return job_cfg


def run_folder_key() -> str:
    """The setting that names this Hydra job's folder, for messages."""
    return "hydra.run.dir" if HydraConfig.get().mode == RunMode.RUN else "hydra.sweep.dir/hydra.sweep.subdir"
